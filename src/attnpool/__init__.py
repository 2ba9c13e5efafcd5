"""attnpool: exact, fast attention pooling for padded and ragged sets."""

from attnpool import functional, nn
from attnpool._sets import Sets, as_sets
from attnpool.functional import attention_pool, segment_softmax

__version__ = "0.1.0"

__all__ = ["Sets", "__version__", "as_sets", "attention_pool", "functional", "nn", "segment_softmax"]
