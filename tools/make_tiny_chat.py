"""Write the bundled tiny_chat dataset: short templated conversations a ~1M-parameter model can learn.

Deterministic (seeded, stdlib only). Train and valid hold disjoint conversations drawn from the
same tasks: capital of a country, addition, reversing words, uppercasing, counting, colours and
opposites; some with a system prompt (the terse one changes the expected answer), some two-turn.

    python tools/make_tiny_chat.py            # rewrites mft/data/bundled/tiny_chat_{train,valid}.jsonl
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--valid", type=int, default=200)
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


if __name__ == "__main__":
    main()
