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
