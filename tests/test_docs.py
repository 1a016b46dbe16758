"""The documentation: runnable code blocks run, relative links resolve, the
API reference builds strictly, and the files speak of versions and dates."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT, tensorflow_only

RUNNABLE = re.compile(r"<!-- runnable -->\s*```python\n(.*?)```", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def tracked(*patterns):
    names = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT,
                           capture_output=True, text=True,
                           check=True).stdout.split()
    return [ROOT / name for name in names]


def markdown_files():
    return tracked("*.md")


def code_blocks():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, block in enumerate(RUNNABLE.findall(path.read_text())):
            yield pytest.param(block, id=f"{path.relative_to(ROOT)}:{i}")


@pytest.mark.parametrize("code", list(code_blocks()))
def test_runnable_code_block_runs(code):
    exec(compile(code, "<markdown>", "exec"), {"__name__": "__docs__"})


def test_the_readme_and_guides_have_runnable_blocks():
    blocks = [p.id.split(":")[0] for p in code_blocks()]
    assert "README.md" in blocks
    assert "docs/guides/examples.md" in blocks


def slug(heading):
    """The anchor GitHub and mkdocs give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines()
            if line.startswith("#")}


def test_relative_links_resolve():
    broken = []
    for path in markdown_files():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # http:, https:, mailto:
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part \
                else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and resolved.suffix == ".md" and \
                    anchor not in anchors(resolved):
                broken.append(f"{path.relative_to(ROOT)}: {target} (anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_import_keras_node_binds_what_the_docs_name():
    # As `import keras` binds `keras.callbacks`: the README's
    # `keras_node.callbacks.LogEvaluationCounts` needs no other import.
    code = ("import keras_node; keras_node.callbacks.LogEvaluationCounts; "
            "keras_node.solvers.DormandPrince; keras_node.gradients.Adjoint")
    result = subprocess.run([sys.executable, "-c", code],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


def test_no_file_speaks_of_work_sessions():
    # Figures name dates, versions or commits. (pytest's fixture scope is
    # the one legitimate use.)
    offending = []
    for path in tracked("*.md", "*.py", "*.sh", "*.toml", "*.yml", "*.cfg"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bsessions?\b", line, re.I) and \
                    'scope="session"' not in line:
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line}")
    assert not offending, "\n".join(offending)


@tensorflow_only("the reference is built once, from the source")
def test_api_reference_builds_strictly(tmp_path):
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
         str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("NeuralODE", "ContinuousNormalizingFlow", "DormandPrince",
                 "Adjoint", "LogEvaluationCounts", "ResumableCheckpoint",
                 "export_saved_model"):
        assert name in api
