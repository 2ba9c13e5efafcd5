"""A knowledge base whose documents are pooled from their chunks: indexing into an embedded LanceDB store,
query-conditioned retrieval, and evaluation on BEIR directories.

Importing this package does not import LanceDB or the encoder; they load when first needed.
"""

from attnpool.kb.knowledge_base import ChunkHit, Hit, IndexReport, KnowledgeBase
from attnpool.kb.methods import METHODS
from attnpool.kb.sources import Document, InputError, read_documents
from attnpool.kb.store import StoreError

__all__ = ["METHODS", "ChunkHit", "Document", "Hit", "IndexReport", "InputError", "KnowledgeBase", "StoreError",
           "read_documents"]
