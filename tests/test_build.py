"""The extension's sources build side by side: torch's ninja build (BuildExtension) names each
object file after its source's stem, so `masks.cpp` and `masks.cu` would both write `masks.o`
and ninja refuses the build ("multiple rules generate ...") on a CUDA machine only, where the .cu
files join. This CPU test keeps the stems distinct."""
from collections import Counter
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_every_source_has_its_own_object_file():
    sources = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu"))
    assert any(s.suffix == ".cu" for s in sources) and any(s.suffix == ".cpp" for s in sources)
    stems = Counter(s.stem for s in sources)
    clashes = {stem: [s.name for s in sources if s.stem == stem]
               for stem, count in stems.items() if count > 1}
    assert not clashes, f"sources that would build the same object file: {clashes}"


def test_nothing_compiled_by_nvcc_throws_or_takes_part_in_dispatch():
    """The CUDA ops' checks, exceptions and dispatcher registration live in host-compiled
    csrc/cuda_ops.cpp; the .cu files hold kernels and non-throwing launchers only (the first H200
    run crashed with SIGSEGV where a check inside an nvcc-compiled op should have raised)."""
    forbidden = ("TORCH_LIBRARY", "TORCH_CHECK", "C10_CUDA_KERNEL_LAUNCH_CHECK", "C10_CUDA_CHECK",
                 "throw", "#include <torch/", "#include <ATen/", "#include <c10/cuda/")
    for source in sorted(CSRC.glob("*.cu")):
        text = source.read_text()
        found = [token for token in forbidden if token in text]
        assert not found, f"{source.name} has {found}"
    ops = (CSRC / "cuda_ops.cpp").read_text()
    for op in ("pack_mask", "unpack_mask", "mask_popcount", "philox_words", "philox_keep_",
               "masked_adamw_"):
        assert f'm.impl("{op}", &regdrop::{op.rstrip("_")}_cuda)' in ops
