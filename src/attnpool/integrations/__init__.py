"""Adapters that plug attnpool modules into other libraries.

Each submodule imports its library when it is imported, so ``import attnpool`` never does:

* :mod:`attnpool.integrations.pyg`: :class:`~attnpool.integrations.pyg.AttnpoolAggregation`, a PyTorch Geometric
  ``Aggregation`` for ``aggr=`` in any message-passing layer or as a global readout;
* :mod:`attnpool.integrations.huggingface`: a pooling head for ``AutoModel`` outputs (``last_hidden_state`` +
  ``attention_mask``) and an encoder + head model with ``save_pretrained``/``from_pretrained``;
* :mod:`attnpool.integrations.sentence_transformers`: a sentence-transformers module that pools token embeddings.
"""
