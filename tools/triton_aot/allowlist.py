"""Known sm_90 performance problems that the compile check accepts for now (see policy.py).

Each entry: kernel (qualname), problem ("spill" or "no-wgmma"), reason; optional dtype
("bf16"/"fp16": a pointer of that type) and where ({constexpr: value} that must all match).
Remove an entry when its kernel is fixed: the check reports entries that match nothing.
"""
ALLOWLIST = [
    {"kernel": "addrop_mask_kernel", "problem": "no-wgmma", "dtype": "bf16",
     "where": {"FROM_ATTR": False, "RESIDENT": True},
     "reason": "resident rows use BLOCK_M=16, below wgmma's 64-row warpgroup tile, so the "
     "dO·Vᵀ dot is mma.sync today; issue 17 fixes"},
]
