"""The sm_90 performance rules of compile.py's results (issue 13, item 6).

A half-precision specialization (a bf16/fp16 pointer or tl.dtype constexpr) that a GPU launches
(recorded by gpu_launches.py's dry run, or an autotune config) must not spill to local memory,
and if it has a `tl.dot` its PTX must use Hopper's `wgmma` (an `mma.sync`-only dot is the
Ampere path, a fraction of sm_90's tensor-core rate). An entry of allowlist.py excuses a
violation with a reason; an entry that excuses nothing is reported as stale.

A result is a dict (compile.py's `compile_entry`): module, qualname, constexprs, ptrs (pointer
types), gpu (bool), regs, stack, spill_stores, smem, dot (bool), wgmma (bool), label.
"""
import re

HALF_POINTERS = ("*bf16", "*fp16")
PROBLEMS = ("spill", "no-wgmma")

_FUNCTION = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict:
    """{stack, spill_stores, spill_loads, regs} of the first function in a `ptxas -v` log
    (Triton compiles one kernel per module); missing fields are None."""
    found = {"stack": None, "spill_stores": None, "spill_loads": None, "regs": None}
    frame = _FRAME.search(log)
    if frame:
        found["stack"], found["spill_stores"], found["spill_loads"] = map(int, frame.groups())
    regs = _REGS.search(log)
    if regs:
        found["regs"] = int(regs.group(1))
    return found


def dtypes(result: dict) -> set:
    """The element types a specialization works in: its pointers', and those of tl.dtype
    constexprs (a kernel that takes its tensors' addresses from a table is told their type so,
    as masked_adamw's DTYPE)."""
    found = {p[1:] for p in result.get("ptrs", ())}
    return found | {v["dtype"] for v in result.get("constexprs", {}).values()
                    if isinstance(v, dict) and "dtype" in v}


def is_checked(result: dict) -> bool:
    """The rules apply to half-precision specializations a GPU launches."""
    return bool(result.get("gpu")) and any(f"*{d}" in HALF_POINTERS for d in dtypes(result))


def problems(result: dict) -> list:
    """The rules `result` breaks (names from PROBLEMS), empty if none or not checked."""
    if not is_checked(result):
        return []
    found = []
    if (result.get("spill_stores") or 0) > 0:
        found.append("spill")
    if result.get("dot") and not result.get("wgmma"):
        found.append("no-wgmma")
    return found


def _matches(entry: dict, result: dict, problem: str) -> bool:
    if entry["kernel"] != result["qualname"] or entry["problem"] != problem:
        return False
    if "dtype" in entry and entry["dtype"] not in dtypes(result):
        return False
    constexprs = result.get("constexprs", {})
    return all(constexprs.get(k) == v for k, v in entry.get("where", {}).items())


def check_allowlist(allowlist) -> None:
    """ValueError naming the first malformed entry (kernel, problem, reason are required)."""
    for i, entry in enumerate(allowlist):
        missing = [k for k in ("kernel", "problem", "reason") if not entry.get(k)]
        if missing:
            raise ValueError(f"allowlist entry {i} lacks {missing}: {entry!r}")
        if entry["problem"] not in PROBLEMS:
            raise ValueError(f"allowlist entry {i}: problem must be one of {PROBLEMS}, got "
                             f"{entry['problem']!r}")
        unknown = set(entry) - {"kernel", "problem", "reason", "dtype", "where"}
        if unknown:
            raise ValueError(f"allowlist entry {i}: unknown keys {sorted(unknown)}")


def judge(results, allowlist) -> dict:
    """{"violations": [(result, problem)], "allowed": [(result, problem, reason)],
    "stale": [entry]}: violations fail the check, allowed ones are printed with their reason,
    stale entries (matching no problem of this run) are reported without failing."""
    check_allowlist(allowlist)
    used = set()
    violations, allowed = [], []
    for result in results:
        for problem in problems(result):
            hits = [i for i, e in enumerate(allowlist) if _matches(e, result, problem)]
            if hits:
                used.update(hits)
                allowed.append((result, problem, allowlist[hits[0]]["reason"]))
            else:
                violations.append((result, problem))
    stale = [e for i, e in enumerate(allowlist) if i not in used]
    return {"violations": violations, "allowed": allowed, "stale": stale}


def verdict(result: dict, judged: dict) -> str:
    """Short verdict of one result for the table: ok, -, FAIL(problem), allowed(problem)."""
    bad = [p for r, p in judged["violations"] if r is result]
    if bad:
        return "FAIL(" + ",".join(bad) + ")"
    excused = [p for r, p, _ in judged["allowed"] if r is result]
    if excused:
        return "allowed(" + ",".join(excused) + ")"
    return "ok" if is_checked(result) else "-"
