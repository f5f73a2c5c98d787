"""The README runs as written: every ```python block executes as pasted, alone (each in a fresh
namespace, in an empty working directory), and every path it names lies in this repository."""
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", TEXT, re.S | re.M)


def test_readme_has_the_documented_examples():
    # quickstart: R-Drop, ChildTuning, AD-DROP, sparse; Trainer: ChildTuningAdamW, make_trainer
    assert len(BLOCKS) >= 6
    assert any("optimizers=(optimizer, None)" in block for block in BLOCKS)
    assert any("make_trainer(" in block for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_as_pasted(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # Trainer output_dir and the like land here
    namespace = {"__name__": "__main__"}
    exec(compile(BLOCKS[index], f"{README}:python-block-{index}", "exec"), namespace)
    checked = 0
    if "loss" in namespace:  # a loss the block computed and back-propagated
        assert math.isfinite(namespace["loss"].item())
        checked += 1
    if "out" in namespace:  # AD-DROP step output
        assert math.isfinite(namespace["out"].loss.item())
        # AdamW keeps state only for parameters that had a gradient at optimizer.step()
        assert namespace["optimizer"].state, "the AD-DROP step's backward reached no parameter"
        checked += 1
    if "trainer" in namespace:
        assert namespace["trainer"].state.global_step == namespace["trainer"].args.max_steps
        checked += 1
    if namespace.get("masks").__class__.__name__ == "MaskTrainer":
        params = dict(namespace["model"].named_parameters())
        assert any(name.endswith("mask_scores") for name in params)
        assert "sparsity" in capsys.readouterr().out.lower()
        checked += 1
    if isinstance(namespace.get("masks"), dict):  # ChildTuning-D masks from fisher_mask
        kept = [m.density for m in namespace["masks"].values() if m is not None]
        assert kept and 0.0 < sum(kept) / len(kept) < 1.0
        checked += 1
    assert checked, "the block defines none of the results this test knows how to check"


@pytest.mark.parametrize("page", ["README.md", "CONTRIBUTING.md", "docs/methods.md",
                                  "docs/design.md", "docs/finetune.md", "docs/distributed.md",
                                  "docs/differences.md"])
def test_docs_point_only_inside_the_repository(page):
    path = ROOT / page
    text = path.read_text()
    assert "../" not in text, f"{page} must not point outside the repository"
    targets = re.findall(r"\]\(([^)#\s]+)", text)  # markdown links, relative to the page
    paths = re.findall(r"`((?:benchmarks|docs|tests|csrc|tools|regdrop_fast|triton_kernels)"
                       r"/[^`\s]*)`", text)  # repository paths in code spans
    assert targets or paths
    for target in targets:
        if not re.match(r"[a-z]+://", target):
            assert (path.parent / target).exists(), f"{page} links {target}: not in the repository"
    for target in paths:
        if "<" in target or "*" in target:  # a pattern such as regdrop_fast/reference/<op>.py
            target = str(Path(target.split("<")[0].split("*")[0]).parent)
        assert (ROOT / target).exists(), f"{page} names {target}: not in the repository"


def test_readme_starts_with_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", TEXT, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]
    assert TEXT.index("```bash") < TEXT.index("## Installation")

