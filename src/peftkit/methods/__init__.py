"""Built-in methods; importing this package registers each one (one folder per method)."""
from peftkit.methods import lora  # noqa: F401
from peftkit.methods import dora  # noqa: F401
from peftkit.methods import ia3  # noqa: F401
from peftkit.methods import adalora  # noqa: F401
from peftkit.methods import adapter  # noqa: F401
from peftkit.methods import prompt  # noqa: F401
from peftkit.methods import prefix  # noqa: F401
from peftkit.methods import ptuning  # noqa: F401
from peftkit.methods import bitfit  # noqa: F401
from peftkit.methods import partial  # noqa: F401
from peftkit.methods import diff_pruning  # noqa: F401
from peftkit.methods import mam  # noqa: F401
from peftkit.methods import unipelt  # noqa: F401
