"""Write the bundled tiny datasets: short templated conversations a ~1M-parameter model can learn.

Deterministic (seeded, stdlib only). Train and valid hold disjoint conversations drawn from the
same tasks: capital of a country, addition, reversing words, uppercasing, counting, colours and
opposites; some with a system prompt (the terse one changes the expected answer), some two-turn.

Also writes tiny_alpaca.jsonl (the same tasks as Alpaca instruction/input/output rows, for the
alpaca_autotrain recipe) and tiny_tools.jsonl (the tasks answered through function calls, for the
function_calling recipe), each from its own seeded generator.

    python tools/make_tiny_chat.py            # rewrites mft/data/bundled/tiny_{chat_train,chat_valid,alpaca,tools}.jsonl
"""

import argparse
import json
import random
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "mft" / "data" / "bundled"

CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Ireland": "Dublin",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago",
    "Argentina": "Buenos Aires", "Brazil": "Brasilia", "Australia": "Canberra", "Russia": "Moscow",
    "Turkey": "Ankara", "Hungary": "Budapest", "Belgium": "Brussels", "Cuba": "Havana",
}
COLOURS = {
    "banana": "yellow", "lemon": "yellow", "strawberry": "red", "tomato": "red", "cherry": "red",
    "grass": "green", "leaf": "green", "lime": "green", "sky": "blue", "sea": "blue",
    "snow": "white", "milk": "white", "cloud": "white", "coal": "black", "crow": "black",
    "carrot": "orange", "pumpkin": "orange", "orange": "orange", "plum": "purple", "grape": "purple",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "old": "new",
    "open": "closed", "happy": "sad", "light": "dark", "early": "late", "full": "empty",
    "hard": "soft", "high": "low", "wet": "dry", "left": "right", "first": "last",
}
WORDS = [
    "cat", "dog", "sun", "moon", "tree", "fish", "bird", "book", "cup", "hat", "car", "star",
    "rain", "milk", "door", "lamp", "ship", "frog", "cake", "bell", "rose", "ring", "key", "box",
]
TERSE = "Answer with as few words as possible."
HELPFUL = "You are a helpful assistant."


def capital(rng):
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?",
                    "Name the capital of {}."]).format(country)
    return q, f"The capital of {country} is {CAPITALS[country]}.", CAPITALS[country]


def addition(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    q = rng.choice(["What is {} + {}?", "Add {} and {}.", "How much is {} plus {}?"]).format(a, b)
    return q, f"{a} + {b} = {a + b}.", str(a + b)


def reverse(rng):
    words = rng.sample(WORDS, rng.randint(3, 4))
    q = rng.choice(["Reverse the words: {}", "Say these words backwards: {}"]).format(" ".join(words))
    answer = " ".join(reversed(words))
    return q, answer, answer


def uppercase(rng):
    word = rng.choice(WORDS + sorted(COLOURS))
    q = rng.choice(["Write {} in capital letters.", "Uppercase this word: {}"]).format(word)
    return q, word.upper(), word.upper()


def counting(rng):
    a = rng.randint(1, 12)
    b = a + rng.randint(2, 6)
    q = rng.choice(["Count from {} to {}.", "List the numbers from {} to {}."]).format(a, b)
    answer = ", ".join(str(i) for i in range(a, b + 1))
    return q, answer, answer


def colour(rng):
    thing = rng.choice(sorted(COLOURS))
    article = "an" if thing[0] in "aeiou" else "a"
    what = "the" if thing in ("sky", "sea", "grass", "snow", "milk", "coal") else article
    q = rng.choice(["What colour is {} {}?", "Which colour is {} {}?"]).format(what, thing)
    return q, f"{what.capitalize()} {thing} is {COLOURS[thing]}.", COLOURS[thing]


def opposite(rng):
    word = rng.choice(sorted(OPPOSITES))
    q = rng.choice(["What is the opposite of {}?", "Give the opposite of {}."]).format(word)
    return q, f"The opposite of {word} is {OPPOSITES[word]}.", OPPOSITES[word]


TASKS = [capital, addition, reverse, uppercase, counting, colour, opposite]


def conversation(rng):
    """One conversation: optional system prompt, one or two question/answer turns."""
    system = rng.choices([None, HELPFUL, TERSE], weights=[6, 1, 2])[0]
    messages = [{"role": "system", "content": system}] if system else []
    for _ in range(rng.choices([1, 2], weights=[3, 1])[0]):
        question, answer, short = rng.choice(TASKS)(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": short if system == TERSE else answer})
    return {"messages": messages}


def alpaca_row(rng):
    """An Alpaca row: some tasks put their argument in `input`, as the Alpaca data does."""
    question, answer, _ = rng.choice(TASKS)(rng)
    if rng.random() < 0.4 and ":" in question:
        instruction, given = question.split(":", 1)
        return {"instruction": instruction.strip() + ".", "input": given.strip(), "output": answer}
    return {"instruction": question, "input": "", "output": answer}


TOOL_SPECS = {
    "add": ("Add two integers", {"a": {"type": "integer"}, "b": {"type": "integer"}}),
    "capital": ("The capital city of a country", {"country": {"type": "string"}}),
    "reverse_words": ("Reverse the order of the words in a text", {"text": {"type": "string"}}),
}


def tool_spec(name):
    description, properties = TOOL_SPECS[name]
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": sorted(properties)}}}


def tool_conversation(rng, n):
    """Ask, call a function, read its result, answer; sometimes a second question the same way."""
    tools = [tool_spec(name) for name in sorted(TOOL_SPECS)]
    messages = [{"role": "system", "content": "Use the functions when they help."}]
    for turn in range(rng.choices([1, 2], weights=[3, 1])[0]):
        kind = rng.choice(sorted(TOOL_SPECS))
        if kind == "add":
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            question, args, result, answer = f"What is {a} + {b}?", {"a": a, "b": b}, {"sum": a + b}, f"{a} + {b} = {a + b}."
        elif kind == "capital":
            country = rng.choice(sorted(CAPITALS))
            question, args = f"What is the capital of {country}?", {"country": country}
            result, answer = {"capital": CAPITALS[country]}, f"The capital of {country} is {CAPITALS[country]}."
        else:
            words = rng.sample(WORDS, 3)
            question, args = f"Reverse the words: {' '.join(words)}", {"text": " ".join(words)}
            result = {"text": " ".join(reversed(words))}
            answer = result["text"]
        call_id = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(9))
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                                                  "function": {"name": kind, "arguments": json.dumps(args)}}]},
            {"role": "tool", "content": json.dumps(result), "tool_call_id": call_id},
            {"role": "assistant", "content": answer},
        ]
    return {"messages": messages, "tools": tools}


def write_extra(out_dir, n_alpaca, n_tools, seed):
    for name, make, n, offset in (("tiny_alpaca", alpaca_row, n_alpaca, 1), ("tiny_tools", tool_conversation, n_tools, 2)):
        rng = random.Random(seed * 1000 + offset)
        rows = [make(rng) if make is alpaca_row else make(rng, i) for i in range(n)]
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {len(rows)} rows to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--valid", type=int, default=200)
    parser.add_argument("--alpaca", type=int, default=400)
    parser.add_argument("--tools", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    lines: dict[str, None] = {}  # insertion-ordered set: conversations are unique, so the splits are disjoint
    while len(lines) < args.train + args.valid:
        lines[json.dumps(conversation(rng), ensure_ascii=False)] = None
    ordered = list(lines)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("valid", ordered[: args.valid]), ("train", ordered[args.valid :])):
        path = args.out_dir / f"tiny_chat_{name}.jsonl"
        path.write_text("".join(line + "\n" for line in chunk), encoding="utf-8")
        print(f"wrote {len(chunk)} conversations to {path}")
    write_extra(args.out_dir, args.alpaca, args.tools, args.seed)


if __name__ == "__main__":
    main()
