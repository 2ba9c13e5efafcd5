"""A small knowledge base for the web tests: the fast hashed bag-of-words encoder, random documents from the kb tests'
word list, and three documents whose words a query can single out."""

from __future__ import annotations

import pytest

pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")
pytest.importorskip("fastapi", reason="the web app needs fastapi and uvicorn (the web extra)")

from attnpool.kb import Document, KnowledgeBase
from tests.kb._fake import HashEncoder
from tests.kb.test_knowledge_base import make_docs

PLANTED = [
    Document("storage-buckets-delete", "Delete a storage bucket. " + "bucket removal retention lock " * 30
             + "zebra quokka marmoset paragraph " * 8
             + "network firewall instance " * 30, title="gcloud storage buckets delete"),
    Document("compute-firewall-create", "Create a firewall rule. " + "ingress egress priority " * 40,
             title="gcloud compute firewall-rules create"),
    Document("pubsub-topics-list", "List the topics of a project. " + "topic subscription publisher " * 40,
             title="gcloud pubsub topics list"),
]


@pytest.fixture(scope="session")
def kb(tmp_path_factory):
    kb = KnowledgeBase(tmp_path_factory.mktemp("web") / "kb", HashEncoder(dim=32), max_tokens=48, overlap=8)
    kb.index([*make_docs(24, words=200), *PLANTED], progress=False)
    # the tests follow the query-conditioned weights to the planted chunk; the default first-chunk prior would keep
    # most of the weight on each page's first chunk
    kb.save_settings(first_bias=0.0)
    return kb


@pytest.fixture(scope="session")
def app(kb):
    from attnpool.web import create_app

    return create_app(kb)
