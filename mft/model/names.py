"""Parameter names as the checkpoint formats know them, whatever wraps the modules at run time."""

# Activation checkpointing (torch's checkpoint_wrapper) and torch.compile insert these.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """`layers.0._checkpoint_wrapped_module.attention.wq` -> `layers.0.attention.wq`."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
