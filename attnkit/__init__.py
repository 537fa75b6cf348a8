"""attnkit: exact softmax attention through interchangeable, plugin-registered backends."""

from .api import attention, backends, explain
from .backend import Backend, Capabilities
from .dropin import sdpa
from .hookspecs import hookimpl
from .kvcache import attention_with_kvcache, merge_attention
from .spec import AttentionProblem

__version__ = "0.1.0"

__all__ = [
    "AttentionProblem",
    "Backend",
    "Capabilities",
    "attention",
    "attention_with_kvcache",
    "backends",
    "explain",
    "hookimpl",
    "merge_attention",
    "sdpa",
]
