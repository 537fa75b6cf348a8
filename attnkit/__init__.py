"""attnkit: exact softmax attention through interchangeable, plugin-registered backends."""

from .api import attention, backends, explain
from .backend import Backend, Capabilities
from .dropin import sdpa
from .hookspecs import hookimpl
from .kvcache import append_paged, attention_with_kvcache, merge_attention
from .spec import AttentionProblem
from .varlen import attention_varlen, explain_varlen

__version__ = "0.1.0"

__all__ = [
    "AttentionProblem",
    "Backend",
    "Capabilities",
    "append_paged",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "backends",
    "explain",
    "explain_varlen",
    "hookimpl",
    "merge_attention",
    "sdpa",
]
