"""Built-in methods; importing this package registers each one (one folder per method)."""
from peftkit.methods import lora  # noqa: F401
