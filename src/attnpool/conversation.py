"""Conversation-history pooling: a context vector from the turns of a conversation and the current message.

The current message ``q`` (unit norm) and the history turns ``t_1 .. t_L`` (oldest first) form one set; the current
message is its last element, at distance 0. Each element gets the logit

.. math::
    z_i = \\cos(q, t_i) / T \\; + \\; \\mathrm{prior}(d_i) \\; + \\; b_{\\mathrm{role}(i)}
    \\; + \\; [i = \\mathrm{current}] \\, b_{\\mathrm{current}}

with ``d_i`` the turn's distance from the current message (1 for the turn just before it, by default; or times
given by the caller), and the context is ``sum_i softmax(z)_i t_i``. The recency prior is either a decay
``prior(d) = -lambda * d`` (``lambda = softplus(.) >= 0``, learnable) or a learnable bias per distance
(``prior="table"``, distances past ``max_distance`` share the last entry). Relevant turns weigh more through the
cosine, recent ones through the prior. The softmax and the weighted sum are attnpool's
(:func:`attnpool.functional.softmax_pool`): fp32 softmax, masked turns never read.

Uses: the contextual query of a knowledge-base search (``attnpool kb search QUESTION --history conversation.json``,
:func:`contextual_query`), and a fixed-size summary vector of a whole conversation (:func:`summarize`).

The benchmark's seeded conversation generator lives here too (:func:`generate_conversations`), so that tests and
``experiments/conversation_retrieval.py`` use the same code.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnpool.functional import softmax_pool

__all__ = ["DEFAULT_SETTINGS", "ROLES", "Conversation", "HistoryPool", "Turn", "command_path", "contextual_query",
           "default_history_pool", "elide_resource", "generate_conversations", "load_history", "resource_groups",
           "summarize"]

#: role names and their index in :class:`HistoryPool`'s role bias
ROLES = ("user", "assistant")
PRIORS = ("decay", "table", "none")
#: the settings of :func:`default_history_pool` (``attnpool kb search --history``): chosen on the tune split of
#: ``experiments/conversation_retrieval.py`` (all-MiniLM-L6-v2; see experiments/results/conversation/results.md).
#: The grid's best decay there was 0: on that benchmark the recency prior did not help (see the results' reading).
DEFAULT_SETTINGS = {"temperature": 0.5, "decay": 0.0, "current_bias": -1.0, "assistant_bias": 0.0}


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x)) if x > 0 else -30.0


class HistoryPool(nn.Module):
    """Attention pooling of a conversation's turns with the current message as the query, plus a recency prior and a
    role bias (formula in the module docstring).

    Args:
        prior: ``"decay"`` (``-lambda * d``), ``"table"`` (a learnable bias per distance ``1..max_distance``) or
            ``"none"``.
        temperature: ``T > 0`` of the relevance term (learnable, kept positive as ``exp`` of a parameter).
        decay: initial ``lambda >= 0`` of the decay prior (the table starts at ``-decay * d`` too).
        max_distance: the table's size.
        current_bias: initial extra logit of the current message.
        num_roles: size of the role bias (``len(ROLES)`` by default; starts at 0).
        learn_temperature: whether ``T`` is a parameter or a fixed buffer.

    Shapes: ``turns`` ``[B, L, D]`` (with ``mask`` ``[B, L]``, True = a real turn) or ``[L, D]`` for one
    conversation; ``query`` ``[B, D]`` or ``[D]``; ``roles`` ``[B, L]`` integer; ``distances`` ``[B, L]`` float.
    Output ``[B, D]`` (``[D]`` unbatched) and, with ``return_weights``, weights ``[B, L + 1]`` (the last column is
    the current message; each row sums to 1). With no turn, the context is the current message alone.
    """

    def __init__(self, prior: str = "decay", *, temperature: float = 0.1, decay: float = 0.5, max_distance: int = 16,
                 current_bias: float = 0.0, num_roles: int = len(ROLES), learn_temperature: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"prior: expected one of {', '.join(PRIORS)}, got {prior!r}")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
            raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
        if not (isinstance(decay, (int, float)) and 0 <= decay < math.inf):
            raise ValueError(f"decay: expected a finite number >= 0, got {decay!r}")
        if not isinstance(max_distance, int) or max_distance < 1:
            raise ValueError(f"max_distance: expected an int >= 1, got {max_distance!r}")
        if not isinstance(num_roles, int) or num_roles < 1:
            raise ValueError(f"num_roles: expected an int >= 1, got {num_roles!r}")
        kw = {"device": device, "dtype": dtype}
        self.prior, self.max_distance, self.num_roles = prior, max_distance, num_roles
        self._init = {"temperature": float(temperature), "decay": float(decay), "current_bias": float(current_bias)}
        log_t = torch.empty((), **kw)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)
        self.decay_param = nn.Parameter(torch.empty((), **kw)) if prior == "decay" else None
        self.distance_bias = nn.Parameter(torch.empty(max_distance, **kw)) if prior == "table" else None
        self.role_bias = nn.Parameter(torch.empty(num_roles, **kw))
        self.current_bias = nn.Parameter(torch.empty((), **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_temperature.fill_(math.log(self._init["temperature"]))
            if self.decay_param is not None:
                self.decay_param.fill_(_inverse_softplus(self._init["decay"]))
            if self.distance_bias is not None:
                d = torch.arange(1, self.max_distance + 1, dtype=self.distance_bias.dtype)
                self.distance_bias.copy_(-self._init["decay"] * d)
            self.role_bias.zero_()
            self.current_bias.fill_(self._init["current_bias"])

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    @property
    def decay(self) -> Tensor | None:
        return None if self.decay_param is None else nn.functional.softplus(self.decay_param)

    def extra_repr(self) -> str:
        parts = [f"prior={self.prior!r}", f"temperature={float(self.temperature.detach()):.4g}"]
        if self.decay is not None:
            parts.append(f"decay={float(self.decay.detach()):.4g}")
        if self.distance_bias is not None:
            parts.append(f"max_distance={self.max_distance}")
        parts += [f"num_roles={self.num_roles}", f"current_bias={float(self.current_bias.detach()):.4g}"]
        return ", ".join(parts)

    def recency_prior(self, distances: Tensor) -> Tensor:
        """The prior's logit for distances ``>= 1`` (any shape)."""
        if self.prior == "none":
            return torch.zeros_like(distances)
        if self.prior == "decay":
            return -self.decay.to(distances.dtype) * distances  # type: ignore[union-attr]
        assert self.distance_bias is not None
        index = distances.round().long().clamp(1, self.max_distance) - 1
        return self.distance_bias.to(distances.dtype)[index]

    def forward(self, turns: Tensor, query: Tensor, *, mask: Tensor | None = None, roles: Tensor | None = None,
                distances: Tensor | None = None, include_current: bool = True,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        unbatched = query.dim() == 1
        if unbatched:
            if turns.dim() != 2:
                raise ValueError(f"turns: expected [L, D] with a [D] query, got shape {tuple(turns.shape)}")
            turns, query = turns.unsqueeze(0), query.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
            roles = None if roles is None else roles.unsqueeze(0)
            distances = None if distances is None else distances.unsqueeze(0)
        if query.dim() != 2:
            raise ValueError(f"query: expected [D] or [B, D], got shape {tuple(query.shape)}")
        b, dim = query.shape
        if turns.dim() != 3 or turns.shape[0] != b or turns.shape[2] != dim:
            raise ValueError(f"turns: expected [B, L, D] = [{b}, L, {dim}], got shape {tuple(turns.shape)}")
        length = turns.shape[1]
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.bool, device=turns.device)
        elif mask.shape != (b, length):
            raise ValueError(f"mask: expected [B, L] = [{b}, {length}], got shape {tuple(mask.shape)}")
        mask = mask.bool()
        ctype = torch.promote_types(turns.dtype, torch.float32)
        if roles is None:
            roles = torch.zeros(b, length, dtype=torch.long, device=turns.device)
        elif roles.shape != (b, length):
            raise ValueError(f"roles: expected [B, L] = [{b}, {length}], got shape {tuple(roles.shape)}")
        elif roles.numel() and bool(((roles < 0) | (roles >= self.num_roles))[mask].any()):
            raise ValueError(f"roles: expected integers in [0, {self.num_roles}), got values "
                             f"{sorted(set(roles[mask].tolist()))}")
        if distances is None:
            # turns after i that are real, plus one: the turn just before the current message is at distance 1
            kept = mask.to(ctype)
            distances = kept.flip(1).cumsum(1).flip(1) - kept + 1
        elif distances.shape != (b, length):
            raise ValueError(f"distances: expected [B, L] = [{b}, {length}], got shape {tuple(distances.shape)}")
        distances = distances.to(ctype)

        safe_turns = torch.where(mask.unsqueeze(-1), turns.to(ctype), torch.zeros((), dtype=ctype))
        q = nn.functional.normalize(query.to(ctype), dim=-1, eps=1e-12)
        relevance = torch.einsum("bd,bld->bl", q, nn.functional.normalize(safe_turns, dim=-1, eps=1e-12))
        logits = (relevance / self.temperature.to(ctype) + self.recency_prior(distances)
                  + self.role_bias.to(ctype)[roles.long().clamp(0, self.num_roles - 1)])
        values = safe_turns
        if include_current:
            current = 1.0 / self.temperature.to(ctype) + self.current_bias.to(ctype) + self.role_bias.to(ctype)[0]
            logits = torch.cat([logits, current.expand(b, 1)], 1)
            values = torch.cat([values, query.to(ctype).unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.bool, device=mask.device)], 1)
        out, weights = softmax_pool(values, logits, mask=mask, return_weights=True)
        out = out.to(turns.dtype if turns.is_floating_point() else ctype)
        weights = weights.reshape(b, -1)
        if unbatched:
            out, weights = out[0], weights[0]
        return (out, weights) if return_weights else out


# -- conversations as data -------------------------------------------------------------------------------------------


@dataclass
class Turn:
    role: str
    text: str


def load_history(source: str | os.PathLike[str] | Sequence[Mapping[str, Any]], *,
                 name: str = "history") -> list[Turn]:
    """Read a conversation history: a JSON file (or the parsed list) of ``{"role": "user"|"assistant", "text": ...}``
    turns, oldest first. Anything else raises ``ValueError`` naming the file and the turn."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"{name}: cannot read the history file ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: expected JSON (a list of {{\"role\", \"text\"}} turns), got invalid JSON at "
                             f"line {e.lineno} column {e.colno}: {e.msg}") from None
    else:
        data = source
    if isinstance(data, Mapping) and "turns" in data:
        data = data["turns"]
    if not isinstance(data, list):
        raise ValueError(f"{name}: expected a list of turns ({{\"role\": \"user\"|\"assistant\", \"text\": ...}}), "
                         f"got {type(data).__name__}")
    turns = []
    for i, t in enumerate(data):
        if not isinstance(t, Mapping):
            raise ValueError(f"{name}: turn {i}: expected an object with \"role\" and \"text\", got "
                             f"{type(t).__name__}")
        role, text = t.get("role"), t.get("text", t.get("content"))
        if role not in ROLES:
            raise ValueError(f"{name}: turn {i}: role: expected one of {', '.join(map(repr, ROLES))}, got {role!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name}: turn {i}: text: expected a non-empty string, got {text!r}")
        turns.append(Turn(role, text))
    return turns


def default_history_pool(**overrides: float) -> HistoryPool:
    """A decay-prior :class:`HistoryPool` with :data:`DEFAULT_SETTINGS` (any of them overridden by keyword)."""
    cfg = {**DEFAULT_SETTINGS, **overrides}
    unknown = set(cfg) - set(DEFAULT_SETTINGS)
    if unknown:
        raise TypeError(f"default_history_pool: unexpected settings {sorted(unknown)}; expected names from "
                        f"{list(DEFAULT_SETTINGS)}")
    pool = HistoryPool("decay", temperature=cfg["temperature"], decay=cfg["decay"], current_bias=cfg["current_bias"])
    with torch.no_grad():
        pool.role_bias[ROLES.index("assistant")] = cfg["assistant_bias"]
    return pool


def contextual_query(pool: HistoryPool, history: Sequence[Turn], question: str, encode: Any) -> tuple[Tensor, Tensor]:
    """The unit-norm query vector ``[D]`` for ``question`` in the context of ``history`` (oldest first), and the
    weights ``[len(history) + 1]`` (the last one is the question's). ``encode(texts)`` returns unit-norm ``[n, D]``
    (for example :meth:`attnpool.kb.KnowledgeBase.encode_queries`)."""
    vectors = torch.as_tensor(encode([t.text for t in history] + [question]))
    roles = torch.tensor([ROLES.index(t.role) for t in history], dtype=torch.long)
    with torch.no_grad():
        out, weights = pool(vectors[:-1].to(torch.float32), vectors[-1].to(torch.float32), roles=roles,
                            return_weights=True)
    return nn.functional.normalize(out, dim=-1, eps=1e-12), weights


def summarize(pool: HistoryPool, turns: Tensor, roles: Tensor | None = None) -> Tensor:
    """A fixed-size unit-norm summary ``[D]`` of a whole conversation ``[L, D]`` (for memory): the turns pooled with
    their normalized mean as the query and the recency prior, the mean itself not included. Zeros for no turn."""
    if turns.shape[0] == 0:
        return turns.new_zeros(turns.shape[1])
    query = nn.functional.normalize(turns.mean(0), dim=-1, eps=1e-12)
    out = pool(turns, query, roles=roles, include_current=False)
    return nn.functional.normalize(out, dim=-1, eps=1e-12)  # type: ignore[arg-type]


# -- the conversational retrieval benchmark's generator --------------------------------------------------------------

_TRACKS = {"alpha", "beta", "preview"}
_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "given", "existing", "specified", "new", "all",
                "one", "or", "more"}
_CHITCHAT = [("user", "Thanks, that worked."), ("assistant", "Glad it helped! Anything else?"),
             ("user", "Great, thank you so much."), ("assistant", "You're welcome."),
             ("user", "Sorry, my coffee spilled, one moment."), ("assistant", "No problem, take your time."),
             ("user", "Ok cool, I will try it after lunch."), ("assistant", "Sounds good, happy to help later."),
             ("user", "Hmm, my manager just pinged me about the quarterly report."),
             ("assistant", "No worries, I'm here when you're ready.")]
KINDS = ("follow-up", "topic-shift", "chit-chat", "off-topic")


def command_path(text: str) -> list[str] | None:
    """The command of a gcloud man page (``["gcloud", "sql", "instances", "create"]``, release track dropped), from
    its SYNOPSIS, or None."""
    m = re.search(r"SYNOPSIS\s+(gcloud[^\[\n]*)", text)
    if not m:
        return None
    words = [w for w in m.group(1).split() if w not in _TRACKS and re.fullmatch(r"[a-z0-9][a-z0-9-]*", w)]
    return words if len(words) >= 2 else None


def resource_groups(corpus: Sequence[Any], queries: Mapping[str, str],
                    qrels: Mapping[str, Mapping[str, int]]) -> dict[str, list[tuple[str, str, str]]]:
    """Command groups (``"gcloud sql instances"``) with at least two judged pages: group -> sorted list of
    ``(verb, doc_id, query_id)``. Each page's query is its one-line description."""
    by_doc = {}
    for qid, rel in qrels.items():
        for d, r in rel.items():
            if r > 0:
                by_doc.setdefault(d, qid)
    groups: dict[str, list[tuple[str, str, str]]] = {}
    for doc in corpus:
        path = command_path(doc.text)
        if path is None or doc.doc_id not in by_doc or by_doc[doc.doc_id] not in queries:
            continue
        if len(path) < 3:  # top-level groups ("gcloud sql") are not one resource
            continue
        groups.setdefault(" ".join(path[:-1]), []).append((path[-1], doc.doc_id, by_doc[doc.doc_id]))
    return {g: sorted(v) for g, v in sorted(groups.items()) if len({verb for verb, _, _ in v}) >= 2}


def _resource_words(group: str) -> set[str]:
    words = set()
    for part in group.split()[1:]:
        for w in part.split("-"):
            words |= {w, w + "s", w[:-1] if w.endswith("s") else w}
            if w.endswith("es"):
                words.add(w[:-2])
            if w.endswith("ies"):
                words.add(w[:-3] + "y")
            if w.endswith("y"):
                words.add(w[:-1] + "ies")
    return {w for w in words if len(w) > 1}


_CONNECTORS = {"to", "from", "for", "of", "in", "on", "with", "by", "into", "about", "under", "at", "and", "using",
               "as", "within", "between", "across"}


def elide_resource(description: str, group: str) -> str | None:
    """``description`` with the resource's noun phrase replaced by a pronoun (``"delete a Cloud SQL instance"`` ->
    ``"delete it"``), or None when no such phrase is found.

    The phrase is the rightmost run of determiners, capitalized words and the group's own words (``sql``,
    ``instance``) that ends with one of the group's words; it must follow the verb or a preposition and be followed
    by nothing or a preposition, so that what is left reads as a sentence."""
    words = description.split()
    resource = _resource_words(group)

    def core(word: str) -> str:
        w = word.strip(".,;:()'\"").lower()
        return w[:-2] if w.endswith("'s") else w

    def in_phrase(word: str) -> bool:
        c = core(word)
        return c in resource or c in _DETERMINERS or word[:1].isupper() or c in {"cloud", "api", "google"}

    for end in range(len(words), 1, -1):
        if core(words[end - 1]) not in resource:
            continue
        if end < len(words) and core(words[end]) not in _CONNECTORS:
            continue
        start = end - 1
        while start > 1 and in_phrase(words[start - 1]):
            start -= 1
        if start > 1 and core(words[start - 1]) not in _CONNECTORS:
            continue
        if start == end - 1 and start > 1 and core(words[start - 1]) == "to" and not words[start][:1].isupper():
            continue  # "to translate between": a verb, not the resource
        last = words[end - 1].strip(".,;:()'\"")
        plural = last.lower().endswith("s") and not last.lower().endswith(("ss", "'s")) and \
            core(last) not in {w.rstrip("s") for w in resource if not w.endswith("s")}
        pronoun = "its" if last.endswith("'s") else ("them" if plural else "it")
        return " ".join([*words[:start], pronoun, *words[end:]])
    return None


@dataclass
class Conversation:
    """A benchmark conversation: ``turns`` (oldest first) end with the user's current message, whose relevant
    document is ``target``. ``kind`` is one of :data:`KINDS`; ``group`` the command group it is about."""

    conv_id: str
    kind: str
    group: str
    turns: list[Turn]
    target: str
    query_id: str
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"conv_id": self.conv_id, "kind": self.kind, "group": self.group, "target": self.target,
                "query_id": self.query_id, "turns": [vars(t) for t in self.turns], **self.notes}


def _ask(rng: random.Random, description: str) -> str:
    return rng.choice(["How do I {}?", "I need to {}.", "How can I {} with gcloud?", "What's the command to {}?",
                       "Can you show me how to {}?"]).format(description)


def _follow(rng: random.Random, elided: str) -> str:
    return rng.choice(["And how do I {}?", "Now {}.", "Ok, next I want to {}.", "How would I {}?",
                       "Great. Can I also {}?"]).format(elided)


def _answer(rng: random.Random, doc_text: str, path: list[str]) -> str:
    m = re.search(r"DESCRIPTION\s+(.+?)(?:\n\s*\n|$)", doc_text, re.S)
    first = " ".join(m.group(1).split())[:200] if m else ""
    first = re.sub(r"^\((ALPHA|BETA|PREVIEW)\)\s*", "", first)
    first = first if len(re.sub(r"\W", "", first)) >= 10 else ""  # some pages' description is empty
    lead = rng.choice(["Use `{}`.", "Run `{}`.", "You can use `{}`."]).format(" ".join(path))
    return f"{lead} {first}".strip()


def generate_conversations(corpus: Sequence[Any], queries: Mapping[str, str], qrels: Mapping[str, Mapping[str, int]],
                           *, seed: int = 0, per_group: int = 6,
                           kinds: Sequence[str] = KINDS) -> list[Conversation]:
    """A seeded conversational retrieval benchmark from a gcloud man-page BEIR set (documented in
    ``experiments/results/conversation/results.md``).

    For each command group with at least two pages whose description names the resource (``elide_resource``), and
    ``per_group`` times, a conversation moves through the group's commands (for example create, then list, then
    delete the same resource). The first question names the resource (the page's description); the follow-ups are
    elliptical (the resource replaced by a pronoun). Each user turn is answered by an assistant turn naming the
    command and quoting its description's first line. The last user turn's page is the target; its turn is never
    answered. Kinds (cycled in order):

    * ``follow-up``: the chain alone;
    * ``topic-shift``: a chain about another group first (first question plus one follow-up), then this group's chain:
      the last turn refers to the recent topic;
    * ``chit-chat``: small talk (two turns) just before the last turn;
    * ``off-topic``: a question on a random unrelated page and its answer just before the last turn: recency alone
      points at the wrong resource.

    In ``off-topic``, the last turn starts with a return phrase ("Back to my earlier question: ").

    The same seed gives the same conversations (``random.Random(seed)``; groups in sorted order).
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kinds: expected names from {', '.join(KINDS)}, got {k!r}")
    if per_group < 1:
        raise ValueError(f"per_group: expected an int >= 1, got {per_group}")
    rng = random.Random(seed)
    texts = {d.doc_id: d.text for d in corpus}
    groups = resource_groups(corpus, queries, qrels)
    usable: dict[str, list[tuple[str, str, str, str]]] = {}
    for g, pages in groups.items():
        rows = [(verb, doc, qid, elide_resource(queries[qid], g)) for verb, doc, qid in pages]
        named = [r for r in rows if r[3] is not None]
        if named and len(rows) >= 2:
            usable[g] = [(v, d, q, e or "") for v, d, q, e in rows]
    names = sorted(usable)
    if not names:
        raise ValueError("corpus: expected gcloud man pages with groups of at least two commands, found none")
    all_pages = [(d.doc_id, qid) for d in corpus for qid in [next((q for q, r in qrels.items() if r.get(d.doc_id, 0)
                                                                   > 0), None)] if qid in queries]
    out: list[Conversation] = []
    n = 0

    def chain(g: str, length: int) -> tuple[list[Turn], tuple[str, str, str, str]]:
        pages = usable[g]
        targets = [p for p in pages if p[3]]
        last = rng.choice(targets)
        others = [p for p in pages if p is not last]
        rng.shuffle(others)
        steps = [*others[:max(1, length - 1)], last]
        turns: list[Turn] = []
        for i, (_, doc, qid, elided) in enumerate(steps):
            path = command_path(texts[doc]) or []
            text = _ask(rng, queries[qid]) if i == 0 else _follow(rng, elided or queries[qid])
            turns.append(Turn("user", text))
            if i < len(steps) - 1:
                turns.append(Turn("assistant", _answer(rng, texts[doc], path)))
        return turns, last

    for g in names:
        for _ in range(per_group):
            kind = kinds[n % len(kinds)]
            turns, last = chain(g, rng.choice([2, 3]))
            notes: dict[str, Any] = {}
            if kind == "topic-shift":
                other = rng.choice([h for h in names if h != g])
                first, shifted = chain(other, 2)
                turns = [*first, Turn("assistant", _answer(rng, texts[shifted[1]], command_path(texts[shifted[1]])
                                                           or [])), *turns]
                notes["shifted_from"] = other
            elif kind in ("chit-chat", "off-topic"):
                if kind == "chit-chat":
                    a = rng.randrange(0, len(_CHITCHAT), 2)
                    inserted = [Turn(*_CHITCHAT[a]), Turn(*_CHITCHAT[a + 1])]
                else:
                    group_docs = {d for _, d, _, _ in usable[g]}
                    doc, qid = rng.choice([p for p in all_pages if p[0] not in group_docs])
                    inserted = [Turn("user", "Unrelated question: " + _ask(rng, queries[qid])),
                                Turn("assistant", _answer(rng, texts[doc], command_path(texts[doc]) or []))]
                    notes["distractor"] = doc
                last_text = turns[-1].text
                if kind == "off-topic":
                    last_text = rng.choice(["Back to my earlier question: how do I {}?", "Going back to before: how "
                                            "can I {}?", "Anyway, how do I {}?"]).format(last[3])
                turns = [*turns[:-1], *inserted, Turn("user", last_text)]
            out.append(Conversation(f"c{n:04d}", kind, g, turns, last[1], last[2], notes))
            n += 1
    return out
