"""Names from outside are text on every page: a run and configurations named with HTML tags,
event handlers, Markdown links, emphasis, table syntax, entities and $...$ are shown as
written in report.md (read by a CommonMark viewer too), report.html, a notebook's
_repr_html_, and the plots; no element, attribute or link comes from a name."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from matplotlib.text import Text
from support.runs import make_run

from lenetlab import Run
from lenetlab.markup import Md, code, md, plain
from lenetlab.recipes import RECIPES

RUN_NAME = "<b onmouseover=alert(1)>x & y | $z$"
NAMES = [
    "<img src=x onerror=alert(1)>",
    "[click](javascript:alert(1))",
    "*em* _u_ __b__ a|b",
    "&lt;entity&gt; &amp; &#60;",
    r"$\frac{1$ and $x^2$",
    "`tick` ~~gone~~ \\ back",
]
# every character the issue names, in one configuration's name
ALL = "<>&\"|[]*_$` mix"
NAMES.append(ALL)

# Elements the report's own text makes; a name may make none (checked by its text, below).
OWN_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "thead",
            "tbody", "tr", "th", "td", "ul", "li", "strong", "em", "code", "pre", "img", "figure",
            "figcaption", "div", "span"}


class Node:
    def __init__(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tag, self.attrs, self.children = tag, attrs, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()


class Tree(HTMLParser):
    """A small DOM from the standard library's HTML parser (void elements closed at once)."""

    VOID = {"img", "meta", "br", "hr", "input", "link"}

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", [])
        self.stack = [self.root]
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs)
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        while len(self.stack) > 1:
            if self.stack.pop().tag == tag:
                break

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def assert_no_markup_from_names(page: str) -> Tree:
    tree = Tree(page)
    for node in tree.root.iter():
        assert node.tag == "#root" or node.tag in OWN_TAGS, f"an element a name made: <{node.tag}>"
        for attr, value in node.attrs:
            assert not attr.lower().startswith("on"), f"<{node.tag} {attr}=...>"
            assert not (value or "").strip().lower().startswith("javascript:"), f"<{node.tag} {attr}={value}>"
    return tree


def tables(tree: Tree) -> list[list[list[str]]]:
    """Each table as rows of cell texts."""
    return [[[cell.text() for cell in row.children if isinstance(cell, Node)]
             for row in table.iter() if row.tag == "tr"]
            for table in tree.root.iter() if table.tag == "table"]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("names") / "run"
    configs = [{"name": name, "base": 0.85 + 0.005 * i, "recipe": RECIPES["baseline"]}
               for i, name in enumerate(NAMES)]
    make_run(run_dir, configs, kind="sweep", reference=NAMES[0], seeds=(0, 1), name=RUN_NAME)
    return run_dir


def test_report_html_shows_every_name_as_written_and_no_name_makes_markup(hostile_run):
    page = (hostile_run / "report.html").read_text(encoding="utf-8")
    tree = assert_no_markup_from_names(page)
    assert not any(node.tag == "a" for node in tree.root.iter())
    title = next(node for node in tree.root.iter() if node.tag == "title").text()
    heading = next(node for node in tree.root.iter() if node.tag == "h1").text()
    assert (title, heading) == (f"{RUN_NAME}: lenetlab report", f"{RUN_NAME}: lenetlab sweep report")
    found = tables(tree)
    results = next(t for t in found if t[0][0] == "Configuration" and "Test" in t[0])
    assert {row[0] for row in results[1:]} == set(NAMES)
    for table in found:  # every row has the header's columns: no name split a cell
        assert {len(row) for row in table} == {len(table[0])}, table[0]
    recipes = next(t for t in found if t[0][:2] == ["Configuration", "Variant"])
    assert [row[0] for row in recipes[1:]] != [] and {row[0] for row in recipes[1:]} == set(NAMES)
    comparisons = next(t for t in found if t[0][:2] == ["Configuration", "Reference"])
    assert {row[1] for row in comparisons[1:]} == {NAMES[0]}
    text = tree.root.text()
    for name in NAMES:  # the sentences name them too, as written
        assert f"{name}: accuracy per epoch" in text
    # every plot was drawn and embedded: one convergence plot per name, and the run's four others
    images = [node for node in tree.root.iter() if node.tag == "img"]
    assert len(images) == len(NAMES) + 3
    assert all(dict(img.attrs)["src"].startswith("data:image/png;base64,") for img in images)
    assert len(list((hostile_run / "plots").glob("*.png"))) == len(NAMES) + 3


def test_report_md_is_text_in_a_commonmark_viewer_with_raw_html_on(hostile_run):
    """report.md opened where Markdown may carry HTML (GitHub, an editor's preview): CommonMark
    with raw HTML allowed still makes no element from a name, and shows each one as written."""
    source = (hostile_run / "report.md").read_text(encoding="utf-8")
    page = MarkdownIt("commonmark", {"html": True}).enable("table").render(source)
    tree = assert_no_markup_from_names(page)
    assert not any(node.tag == "a" for node in tree.root.iter())
    heading = next(node for node in tree.root.iter() if node.tag == "h1").text()
    assert heading == f"{RUN_NAME}: lenetlab sweep report"
    results = next(t for t in tables(tree) if t[0][0] == "Configuration" and "Test" in t[0])
    assert {row[0] for row in results[1:]} == set(NAMES)
    assert all(len(row) == len(results[0]) for row in results)


def test_a_notebook_shows_the_names_as_text(hostile_run):
    pytest.importorskip("pandas")
    page = Run(hostile_run)._repr_html_()
    tree = assert_no_markup_from_names(page)
    assert next(node for node in tree.root.iter() if node.tag == "h3").text() == f"{RUN_NAME}: lenetlab sweep"
    rows = [row for table in tables(tree) for row in table]
    assert set(NAMES) <= {row[0] for row in rows}
    captions = {node.text() for node in tree.root.iter() if node.tag == "figcaption"}
    assert {f"{name}: accuracy per epoch" for name in NAMES} <= captions


def test_plot_titles_and_legends_hold_the_names_as_written(hostile_run):
    run = Run(hostile_run)
    for name in NAMES:
        figure = run.plot("convergence", name)
        title = figure.axes[0].get_title()
        assert title.startswith(f"{name}: accuracy per epoch")
        assert figure._repr_png_().startswith(b"\x89PNG")
        assert not any(text.get_parse_math() for text in figure.findobj(Text))
    overlay = run.plot("overlay")
    legend = [text.get_text() for text in overlay.axes[0].get_legend().get_texts()]
    assert sorted(legend) == sorted(NAMES)
    overlay._repr_png_()  # drawn with '$\frac{1$' in a label: no mathtext error


@pytest.mark.parametrize("value", [*NAMES, RUN_NAME, "plain", "batch_norm", "a\nb\x1b[31m"])
def test_md_and_code_give_the_characters_back_through_both_converters(value):
    """Each way a value enters report.md renders to exactly its characters."""
    import markdown

    from lenetlab.markup import text_only

    shown = plain(value)
    for text in (md(value), code(value), Md("**{}**").format(value)):
        ours = Tree(markdown.markdown(text, extensions=["tables", text_only()])).root.text()
        commonmark = Tree(MarkdownIt("commonmark", {"html": True}).render(text)).root.text()
        assert ours.strip() == commonmark.strip() == shown


def test_the_terminal_gets_names_with_control_characters_as_escapes(tmp_path, hostile_run):
    """A folder or file name may hold a terminal's escape sequences or a newline: each command
    prints it as text on its one line, never as the codes themselves."""
    import shutil

    from conftest import run_cli
    from PIL import Image

    odd = "x\x1b[2J\x1b]0;owned\x07\ny"
    runs = tmp_path / "runs"
    shutil.copytree(hostile_run, runs / odd)
    listed = run_cli("runs", runs)
    assert listed.returncode == 0
    assert listed.stdout.count("\n") == 1 and "\x1b" not in listed.stdout and "\x07" not in listed.stdout
    assert listed.stdout.startswith(plain(odd))

    picture = tmp_path / f"{odd}.png"
    Image.new("L", (28, 28), 200).save(picture)
    missing = run_cli("evaluate", tmp_path / f"{odd}.pth")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "\x1b" not in missing.stderr
    weights = next(hostile_run.glob("models/seed0/*.pth"))
    predicted = run_cli("predict", weights, picture)
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.count("\n") == 1 and "\x1b" not in predicted.stdout
    assert plain(picture) in predicted.stdout


def test_mlflow_keeps_the_names_as_written(hostile_run, tmp_path):
    """log-mlflow into a real store: the experiment, each trial's run name, tags and parameters
    hold the names as written (MLflow's own pages show them as text)."""
    mlflow = pytest.importorskip("mlflow")
    from conftest import run_cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = run_cli("log-mlflow", hostile_run, "--mlflow", uri)
    assert logged.returncode == 0, logged.stderr
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(RUN_NAME)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    trials = [run for run in runs if "lenetlab.trial" in run.data.tags]
    assert {run.data.tags["config"] for run in trials} == set(NAMES)
    assert {run.data.params["config"] for run in trials} == set(NAMES)
    keys = {f"{name}__seed{seed}" for name in NAMES for seed in (0, 1)}
    assert {run.info.run_name for run in trials} == keys
