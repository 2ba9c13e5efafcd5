import json
import math

import pytest
import torch

from attnpool.conversation import (
    KINDS,
    ROLES,
    HistoryPool,
    command_path,
    contextual_query,
    elide_resource,
    generate_conversations,
    load_history,
    resource_groups,
    summarize,
)
from attnpool.kb import Document


def reference(turns, query, roles, distances, *, temperature, prior, current_bias, role_bias):
    """The module docstring's formula, element by element, in float64."""
    turns, query = turns.double(), query.double()
    q = query / query.norm()
    logits, values = [], []
    for t, r, d in zip(turns, roles.tolist(), distances.tolist()):
        cos = float(q @ t) / float(t.norm())
        logits.append(cos / temperature + prior(d) + role_bias[r])
        values.append(t)
    logits.append(1.0 / temperature + current_bias + role_bias[0])
    values.append(query)
    m = max(logits)
    e = [math.exp(z - m) for z in logits]
    w = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
    return (w[:, None] * torch.stack(values)).sum(0), w


def random_case(n=5, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    turns = torch.randn(n, dim, generator=g, dtype=dtype)
    query = torch.randn(dim, generator=g, dtype=dtype)
    roles = torch.tensor([i % 2 for i in range(n)])
    return turns, query, roles


@pytest.mark.parametrize("prior", ["decay", "table", "none"])
def test_matches_float64_reference(prior):
    turns, query, roles = random_case()
    pool = HistoryPool(prior, temperature=0.3, decay=0.7, current_bias=-0.5, max_distance=3, dtype=torch.float64)
    with torch.no_grad():
        pool.role_bias.copy_(torch.tensor([0.2, -0.4], dtype=torch.float64))
        if prior == "table":
            pool.distance_bias.copy_(torch.tensor([0.5, -1.0, -2.0], dtype=torch.float64))
    out, w = pool(turns, query, roles=roles, return_weights=True)
    n = turns.shape[0]
    distances = torch.arange(n, 0, -1, dtype=torch.float64)
    table = {1: 0.5, 2: -1.0, 3: -2.0}
    decay = float(pool.decay.detach()) if prior == "decay" else 0.0  # 0.7 up to the softplus round trip
    assert decay == pytest.approx(0.7 if prior == "decay" else 0.0, rel=1e-6)
    priors = {"decay": lambda d: -decay * d, "table": lambda d: table[min(int(d), 3)], "none": lambda d: 0.0}
    ref_out, ref_w = reference(turns, query, roles, distances, temperature=float(pool.temperature.detach()),
                               prior=priors[prior], current_bias=-0.5, role_bias=[0.2, -0.4])
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    assert float(w.detach().sum()) == pytest.approx(1.0, abs=1e-12)


@torch.no_grad()
def test_batched_with_mask_equals_each_conversation_alone():
    pool = HistoryPool(temperature=0.2, decay=0.3, dtype=torch.float64)
    cases = [random_case(n, seed=n) for n in (3, 1, 4)]
    turns = torch.zeros(3, 4, 8, dtype=torch.float64)
    turns.fill_(float("nan"))  # padding is never read
    mask = torch.zeros(3, 4, dtype=torch.bool)
    roles = torch.zeros(3, 4, dtype=torch.long)
    for i, (t, _, r) in enumerate(cases):
        turns[i, 4 - len(t):] = t  # right-aligned: distances count real turns only
        mask[i, 4 - len(t):] = True
        roles[i, 4 - len(t):] = r
    query = torch.stack([q for _, q, _ in cases])
    out, w = pool(turns, query, mask=mask, roles=roles, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    for i, (t, q, r) in enumerate(cases):
        o1, w1 = pool(t, q, roles=r, return_weights=True)
        torch.testing.assert_close(out[i], o1)
        torch.testing.assert_close(w[i, 4 - len(t):], w1)
        assert (w[i, :4 - len(t)] == 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(3, dtype=torch.float64))


@torch.no_grad()
def test_recency_prior_favours_the_recent_of_two_equally_relevant_turns():
    query = torch.tensor([1.0, 0.0, 0.0])
    same = torch.tensor([0.6, 0.8, 0.0])
    turns = torch.stack([same, same])  # oldest first
    _, w = HistoryPool(decay=0.5)(turns, query, return_weights=True)
    assert w[1] > w[0]
    assert float(w[1] / w[0]) == pytest.approx(math.exp(0.5), rel=1e-5)
    _, w = HistoryPool(decay=0.0)(turns, query, return_weights=True)
    assert float(w[1] / w[0]) == pytest.approx(1.0, rel=1e-6)


@torch.no_grad()
def test_relevant_turns_weigh_more():
    query = torch.tensor([1.0, 0.0])
    turns = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # the relevant one is not the most recent
    _, w = HistoryPool(decay=0.1, temperature=0.1)(turns, query, return_weights=True)
    assert w[1] > w[0] and w[1] > w[2]


@torch.no_grad()
def test_role_bias_shifts_weight_between_roles():
    query = torch.tensor([1.0, 0.0])
    turns = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    roles = torch.tensor([ROLES.index("user"), ROLES.index("assistant")])
    pool = HistoryPool(prior="none")
    _, w0 = pool(turns, query, roles=roles, return_weights=True)
    assert float(w0[0]) == pytest.approx(float(w0[1]))
    with torch.no_grad():
        pool.role_bias[ROLES.index("assistant")] = 1.0
    _, w = pool(turns, query, roles=roles, return_weights=True)
    assert float(w[1] / w[0]) == pytest.approx(math.e, rel=1e-5)


@torch.no_grad()
def test_empty_history_gives_the_current_message_alone():
    query = torch.tensor([0.3, -2.0, 1.0])
    out, w = HistoryPool()(torch.zeros(0, 3), query, return_weights=True)
    torch.testing.assert_close(out, query)
    torch.testing.assert_close(w, torch.ones(1))
    # batched, one conversation with history and one fully masked
    turns = torch.randn(2, 3, 3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    queries = torch.randn(2, 3)
    out, w = HistoryPool()(turns, queries, mask=mask, return_weights=True)
    torch.testing.assert_close(out[1], queries[1])
    assert w[1, :3].eq(0).all() and float(w[1, 3]) == 1.0


@torch.no_grad()
def test_summary_of_no_turn_is_zero_and_is_unit_norm_otherwise():
    pool = HistoryPool()
    assert summarize(pool, torch.zeros(0, 4)).eq(0).all()
    s = summarize(pool, torch.randn(3, 4))
    assert float(s.norm()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("prior", ["decay", "table"])
def test_gradients_reach_the_prior_and_gradcheck(prior):
    turns, query, roles = random_case(n=4, dim=5)
    pool = HistoryPool(prior, temperature=0.5, decay=0.4, max_distance=5, dtype=torch.float64)
    out = pool(turns, query, roles=roles)
    out.sum().backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    prior_param = pool.decay_param if prior == "decay" else pool.distance_bias
    assert prior_param.grad.abs().sum() > 0

    names = [n for n, _ in pool.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in pool.parameters())

    def f(*ps):
        return torch.func.functional_call(pool, dict(zip(names, ps)), (turns, query), {"roles": roles})

    assert torch.autograd.gradcheck(f, params)


def test_no_nan_gradient_for_empty_history():
    pool = HistoryPool()
    query = torch.randn(3, requires_grad=True)
    turns = torch.zeros(2, 0, 3, requires_grad=True)
    out = pool(turns, query.expand(2, 3), mask=torch.zeros(2, 0, dtype=torch.bool))
    out.sum().backward()
    assert torch.isfinite(query.grad).all()


def test_module_conventions():
    pool = HistoryPool("table", temperature=0.2, decay=0.5, max_distance=4)
    with torch.no_grad():
        pool.distance_bias.zero_()
        pool.role_bias.fill_(3.0)
    pool.reset_parameters()
    torch.testing.assert_close(pool.distance_bias, -0.5 * torch.arange(1.0, 5.0))
    assert pool.role_bias.eq(0).all()
    assert float(pool.temperature.detach()) == pytest.approx(0.2)
    assert "prior='table'" in repr(pool) and "temperature=0.2" in repr(pool)
    assert float(HistoryPool(decay=0.7).decay.detach()) == pytest.approx(0.7, rel=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"prior": "linear"}, "prior: expected one of"),
    ({"temperature": 0.0}, "temperature: expected a finite number > 0"),
    ({"decay": -1.0}, "decay: expected a finite number >= 0"),
    ({"max_distance": 0}, "max_distance"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HistoryPool(**kwargs)


def test_bad_forward_arguments():
    pool = HistoryPool()
    with pytest.raises(ValueError, match="roles: expected integers in"):
        pool(torch.randn(2, 3), torch.randn(3), roles=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="turns: expected"):
        pool(torch.randn(2, 4), torch.randn(3))
    with pytest.raises(ValueError, match="mask: expected"):
        pool(torch.randn(1, 2, 3), torch.randn(1, 3), mask=torch.ones(1, 3, dtype=torch.bool))


# -- history files --------------------------------------------------------------------------------------------------


def test_load_history_reads_turns(tmp_path):
    p = tmp_path / "h.json"
    p.write_text(json.dumps([{"role": "user", "text": "create a bucket"}, {"role": "assistant", "text": "ok"}]))
    turns = load_history(p)
    assert [(t.role, t.text) for t in turns] == [("user", "create a bucket"), ("assistant", "ok")]
    assert load_history([]) == []


@pytest.mark.parametrize("content, match", [
    ("{not json", "invalid JSON at line 1"),
    ('{"a": 1}', "expected a list of turns"),
    ('[{"role": "bot", "text": "hi"}]', "turn 0: role: expected one of 'user', 'assistant', got 'bot'"),
    ('[{"role": "user", "text": ""}]', "turn 0: text: expected a non-empty string"),
    ('[{"role": "user", "text": "a"}, 3]', "turn 1: expected an object"),
])
def test_load_history_errors_name_the_file_and_turn(tmp_path, content, match):
    p = tmp_path / "conv.json"
    p.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        load_history(p)
    assert "conv.json" in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        load_history(tmp_path / "missing.json")


def test_contextual_query_weights_history_and_question():
    vocab = {"create": [1.0, 0, 0], "bucket": [0, 1.0, 0], "delete": [0, 0, 1.0]}

    def encode(texts):
        out = torch.tensor([[sum(vocab[w][i] for w in t.split() if w in vocab) for i in range(3)] for t in texts])
        return torch.nn.functional.normalize(out + 1e-3, dim=-1)

    history = load_history([{"role": "user", "text": "create bucket"}, {"role": "assistant", "text": "create bucket"}])
    q, w = contextual_query(HistoryPool(temperature=1.0, decay=0.0), history, "delete", encode)
    assert w.shape == (3,) and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(q.norm()) == pytest.approx(1.0, abs=1e-6)
    assert q[1] > 0.1 and q[2] > 0.1  # the resource from the history and the verb from the question


# -- the benchmark generator ----------------------------------------------------------------------------------------

PAGES = {
    "gcloud sql instances create": "create a Cloud SQL instance",
    "gcloud sql instances delete": "delete a Cloud SQL instance",
    "gcloud sql instances list": "list Cloud SQL instances",
    "gcloud pubsub topics create": "create one or more Cloud Pub/Sub topics",
    "gcloud pubsub topics delete": "delete one or more Cloud Pub/Sub topics",
    "gcloud pubsub topics publish": "publish a message to a Cloud Pub/Sub topic",
    "gcloud compute disks resize": "resize a disk",
    "gcloud compute disks snapshot": "snapshot the contents of a disk",
}


def fake_corpus():
    corpus, queries, qrels = [], {}, {}
    for i, (path, desc) in enumerate(PAGES.items()):
        words = path.split()
        text = (f"SYNOPSIS\n       {' '.join([*words[:1], 'beta', *words[1:]])} NAME [--flag=FLAG]\n\nDESCRIPTION\n"
                f"       (BETA) {desc.capitalize()} in the project.\n\nEXAMPLES\n       $ {path} x\n")
        corpus.append(Document(f"d{i}", text))
        queries[f"q{i}"] = desc
        qrels[f"q{i}"] = {f"d{i}": 1}
    return corpus, queries, qrels


def test_command_path_and_groups():
    corpus, queries, qrels = fake_corpus()
    assert command_path(corpus[0].text) == ["gcloud", "sql", "instances", "create"]
    groups = resource_groups(corpus, queries, qrels)
    assert set(groups) == {"gcloud sql instances", "gcloud pubsub topics", "gcloud compute disks"}
    assert [v for v, _, _ in groups["gcloud sql instances"]] == ["create", "delete", "list"]


@pytest.mark.parametrize("desc, group, expected", [
    ("delete a Cloud SQL instance", "gcloud sql instances", "delete it"),
    ("list Cloud SQL instances", "gcloud sql instances", "list them"),
    ("publish a message to a Cloud Pub/Sub topic", "gcloud pubsub topics", "publish a message to it"),
    ("snapshot the contents of a disk", "gcloud compute disks", "snapshot the contents of it"),
    ("import data to an AlloyDB cluster from Google Cloud Storage", "gcloud alloydb clusters",
     "import data to it from Google Cloud Storage"),
    ("use the Google Cloud Translation API to translate between languages", "gcloud ml translate", None),
    ("manage your App Engine deployments", "gcloud app", None),
])
def test_elide_resource(desc, group, expected):
    assert elide_resource(desc, group) == expected


def test_generator_is_deterministic_and_has_pronouns_and_distractors():
    corpus, queries, qrels = fake_corpus()
    a = generate_conversations(corpus, queries, qrels, seed=3, per_group=8)
    b = generate_conversations(corpus, queries, qrels, seed=3, per_group=8)
    c = generate_conversations(corpus, queries, qrels, seed=4, per_group=8)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.to_dict() for x in a] != [x.to_dict() for x in c]
    assert {x.kind for x in a} == set(KINDS)
    by_doc = {d.doc_id: d for d in corpus}
    for conv in a:
        last = conv.turns[-1]
        assert last.role == "user" and conv.turns[0].role == "user"
        assert any(w in last.text.split() for w in ("it?", "it.", "them?", "them.", "it", "them")), last.text
        target_desc = queries[conv.query_id]
        assert command_path(by_doc[conv.target].text)[:-1] == conv.group.split()
        assert target_desc not in last.text  # elliptical: the resource is not named
        first_user = next(t for t in conv.turns if t.role == "user")
        if conv.kind == "off-topic":
            assert conv.turns[-2].role == "assistant" and "Unrelated question" in conv.turns[-3].text
            group_docs = {d for _, d, _ in resource_groups(corpus, queries, qrels)[conv.group]}
            assert conv.notes["distractor"] not in group_docs
        elif conv.kind == "topic-shift":
            assert conv.notes["shifted_from"] != conv.group
            assert conv.notes["shifted_from"].split()[-1].rstrip("s") not in last.text
        elif conv.kind == "chit-chat":
            assert conv.turns[-3].role == "user" and "gcloud" not in conv.turns[-2].text
        assert first_user.text
    with pytest.raises(ValueError, match="kinds: expected names"):
        generate_conversations(corpus, queries, qrels, kinds=["nope"])


# -- `attnpool kb search --history` ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory):
    pytest.importorskip("lancedb", reason="the knowledge base's store needs lancedb (the kb extra)")
    from attnpool.kb import KnowledgeBase
    from tests.kb._fake import HashEncoder

    path = tmp_path_factory.mktemp("kb") / "store"
    kb = KnowledgeBase(path, HashEncoder(dim=16), max_tokens=32, overlap=4)
    words = ["bucket", "instance", "topic", "cluster"]
    docs = [Document(f"{v}-{w}", f"{v} {w} " * 30 + f"how to {v} a {w}", title=f"{v} {w}")
            for w in words for v in ("create", "delete", "list")]
    kb.index(docs, progress=False)
    return kb


def run_cli(monkeypatch, kb, argv, capsys):
    from attnpool import cli
    from attnpool.kb import cli as kb_cli

    monkeypatch.setattr(kb_cli, "_kb", lambda args: kb)
    code = cli.main(argv)
    return code, capsys.readouterr()


def test_cli_search_with_history(tmp_path, monkeypatch, capsys, small_kb):
    h = tmp_path / "conversation.json"
    h.write_text(json.dumps([{"role": "user", "text": "create a topic"},
                             {"role": "assistant", "text": "create topic"}]))
    code, out = run_cli(monkeypatch, small_kb, ["kb", "search", "delete it", "--history", str(h), "--json"], capsys)
    assert code == 0, out.err
    data = json.loads(out.out)
    assert [t["role"] for t in data["turn_weights"]] == ["user", "assistant", "user"]
    assert sum(t["weight"] for t in data["turn_weights"]) == pytest.approx(1.0, abs=1e-5)
    assert data["turn_weights"][-1]["text"] == "delete it"
    from attnpool.conversation import default_history_pool

    q, w = contextual_query(default_history_pool(), load_history(h), "delete it", small_kb.encode_queries)
    assert [t["weight"] for t in data["turn_weights"]] == pytest.approx(w.tolist())
    assert [x["doc_id"] for x in data["hits"]] == [x.doc_id for x in small_kb.search(q)]
    code, out = run_cli(monkeypatch, small_kb, ["kb", "search", "delete it", "--history", str(h)], capsys)
    assert code == 0 and "turn weights" in out.out and "assistant" in out.out
    h.write_text("[]")  # no history: the question alone, as a plain search
    code, out = run_cli(monkeypatch, small_kb, ["kb", "search", "delete it", "--history", str(h), "--json"], capsys)
    data = json.loads(out.out)
    assert code == 0 and [t["weight"] for t in data["turn_weights"]] == pytest.approx([1.0])
    assert [x["doc_id"] for x in data["hits"]] == [x.doc_id for x in small_kb.search("delete it")]


def test_cli_search_with_bad_history_is_one_clear_line(tmp_path, monkeypatch, capsys, small_kb):
    h = tmp_path / "conversation.json"
    h.write_text(json.dumps([{"role": "system", "text": "be nice"}]))
    code, out = run_cli(monkeypatch, small_kb, ["kb", "search", "delete it", "--history", str(h)], capsys)
    assert code == 2
    assert "--history" in out.err and "conversation.json: turn 0: role" in out.err and "Traceback" not in out.err
