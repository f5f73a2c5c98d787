"""Record the Triton launches the library makes on a GPU, without a GPU.

    python tools/triton_aot/gpu_launches.py launches.jsonl

Under the interpreter the launchers pick small CPU tiles, so a recorded test run misses the
specializations a GPU compiles (bf16 tensor-core tiles, streamed paths, more warps). This
script calls each launcher in triton_kernels/ on meta-device tensors of BERT-base-like shapes
and of the GPU benchmarks' main cases (regdrop_fast/benchmarking, issue 13) with record.py
installed: the launcher takes its non-CPU branch, and the recorder appends the
launch (or, for an autotuned kernel, each config) without running it. compile.py then
compiles the file, each launch of an autotuned kernel at every config of its autotuner as a
GPU imports it (a config list chosen at import, as masked attention's, is the interpreter's
here). A launcher that cannot be dry-run this way fails the script with the
reason: update the call here when a launcher's signature changes. Options a launcher may not
have yet (is_causal) are passed only when its signature names them (`optional`).
"""
import importlib.util
import inspect
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

META = torch.device("meta")
B, H, L, D, HIDDEN, FFN, VOCAB = 8, 12, 128, 64, 768, 3072, 30522
SEED = 0x0123456789ABCDEF  # low half >= 2**31: the i64 specialization of the seed halves


# The GPU benchmarks' main cases (16k tokens; see the bench modules): attention (B, H, L, D),
# masked linear (tokens, in, out), R-Drop vocabularies at N = 8192 rows.
ATTENTION_CASES = [(16384 // n, 12, n, 64) for n in (512, 1024, 2048, 4096)] + [(8, 32, 2048, 128)]
LINEAR_CASES = [(16384, 768, 3072), (16384, 3072, 768), (16384, 1024, 4096), (16384, 4096, 1024)]
RDROP_VOCABS = (2, 32000, 50265, 128256, 151936)


def t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


def optional(fn, **options):
    """The subset of `options` that fn's signature accepts (features other work may add)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in params}


def philox_and_masks():
    from regdrop_fast.triton_kernels import masks, philox

    for seed in (SEED, 1234):
        philox.philox_words(seed, t(1 << 20, dtype=torch.int64), 3, 1)
        philox.philox_keep(1 << 20, 0, seed, 3, 1, 3 << 30, META)
    masks.pack_bits(t(FFN, HIDDEN, dtype=torch.bool))
    masks.unpack_bits(t(FFN, HIDDEN // 32, dtype=torch.int32), HIDDEN)


def rdrop():
    from regdrop_fast.triton_kernels import rdrop as K

    for dtype in (torch.bfloat16, torch.float32):
        # token LM head, sentence classifier, the benchmarks' vocabularies
        for rows, vocab in ((B * L, VOCAB), (32, 2), *((8192, v) for v in RDROP_VOCABS)):
            z = t(rows, vocab, dtype=dtype)
            K.rdrop_forward(z, z, t(rows, dtype=torch.int64), 1.0, -100, True, True)
            K.rdrop_forward(z, z, None, 1.0, -100, False, False)
            K.rdrop_scale_grads_(z, z, t(rows, dtype=torch.float32))


def addrop_mask():
    from regdrop_fast.triton_kernels import addrop_mask as K

    streams = t(12, dtype=torch.int64)  # ADDrop.step: all 12 layers of BERT-base, one launch
    for dtype in (torch.bfloat16, torch.float32):
        for lk in (L, 512, 4096):  # resident row, the L=512 train step, streamed row
            kpm = t(B, lk, dtype=torch.bool)
            K.keep_mask_bits(t(B, H, L, lk, dtype=dtype), None, kpm, 0.7, 3 << 30, SEED, 2, 0,
                             False)
            for causal in (False, True):
                K.keep_mask_bits(t(B, H, L, D, dtype=dtype), t(B, H, lk, D, dtype=dtype), None,
                                 0.3, 3 << 30, SEED, 2, 0, True, causal)
                K.keep_mask_bits(t(12, B, H, L, D, dtype=dtype), t(12, B, H, lk, D, dtype=dtype),
                                 kpm, 0.7, 3 << 30, SEED, 2, streams, False, causal)
    # attribution="random" on BERT-base (B=32, L=128, all 12 layers), padded and causal rows,
    # Lk % 4 == 0 (one Philox call per 4 keys) and not
    for lk in (L, L + 1):
        for kpm in (t(32, lk, dtype=torch.bool), None):
            for causal in (False, True):
                K.random_mask_bits((32, H, L, lk), 12, kpm, 3 << 30, 1 << 30, SEED, 2,
                                   t(24, dtype=torch.int64), causal, META)


def masked_attention():
    from regdrop_fast.triton_kernels import masked_attention as K

    cases = [(torch.bfloat16, (B, H, L, D)), (torch.bfloat16, (B, H, L, 128)),
             (torch.float32, (B, H, L, D)), *((torch.bfloat16, c) for c in ATTENTION_CASES)]
    causal_options = [{}] + [o for o in [optional(K.masked_attention_forward, is_causal=True)]
                             if o]
    for dtype, (b, h, n, d) in cases:
        q = t(b, h, n, d, dtype=dtype)
        lse = t(2, b, h, n, dtype=torch.float32)  # logsumexp and delta (one buffer)
        dummy = t(1, dtype=torch.uint8)
        for masks, p in ((K.MaskArgs(t(b, h, n, n // 32, dtype=torch.int32),
                                     t(b, n, dtype=torch.bool), None, dummy), 0.1),
                         (K.MaskArgs(None, None, t(b, 1, 1, n, dtype=dtype), dummy), 0.0)):
            for extra in causal_options:
                back = optional(K.masked_attention_backward, **extra)
                K.masked_attention_forward(q, q, q, masks, d ** -0.5, p, SEED, 5, 2, **extra)
                K.masked_attention_backward(q, q, q, q, q, lse, masks, d ** -0.5, p, SEED, 5, 2,
                                            **back)


def masked_linear():
    """backend="triton" at the bench's flag sets (bias on; scores with W frozen: dScore only;
    packed bits with W trained: dW only) and both gradients: each autotune config a GPU tries
    (the launchers take their GPU branch on meta)."""
    from regdrop_fast.triton_kernels import masked_linear as K

    for tokens, n_in, n_out in ((B * L, HIDDEN, FFN), *LINEAR_CASES):
        x, w, dy, b = t(tokens, n_in), t(n_out, n_in), t(tokens, n_out), t(n_out)
        words, phi = t(n_out, n_in // 32, dtype=torch.int32), t(1, dtype=torch.float32)
        scores = t(n_out, n_in, dtype=torch.float32)
        for source in ((words, None, None), (None, scores, phi)):
            K.masked_linear_forward(x, w, b, *source)
            K.masked_linear_forward(x, w, None, *source)
            K.masked_linear_backward_input(dy, w, *source)
        K.masked_linear_backward_weight(dy, x, w, None, scores, phi, True, False)
        K.masked_linear_backward_weight(dy, x, w, words, None, None, False, True)
        K.masked_linear_backward_weight(dy, x, w, None, scores, phi, True, True)


def mask_training():
    """The default masked linear's elementwise passes at the bench weights (out, in): fp32
    weights under bf16 autocast (the training-step bench) and bf16 weights (the op bench)."""
    from regdrop_fast.triton_kernels import mask_training as K

    weights = {(n_out, n_in) for _, n_in, n_out in LINEAR_CASES} | {(HIDDEN, HIDDEN),
                                                                     (1024, 1024)}
    for n_out, n_in in sorted(weights):
        words, phi = t(n_out, n_in // 32, dtype=torch.int32), t(1, dtype=torch.float32)
        scores, g = t(n_out, n_in, dtype=torch.float32), t(n_out, n_in)
        for w in (t(n_out, n_in, dtype=torch.float32), t(n_out, n_in)):
            K.materialize(w, None, scores, phi, torch.bfloat16)
            K.materialize(w, words, None, None, torch.bfloat16)
            K.ste_grads(g, w, None, scores, phi, True, False, torch.float32)  # frozen W
            K.ste_grads(g, w, None, scores, phi, True, True, torch.float32)
            K.ste_grads(g, w, words, None, None, False, True, torch.float32)


def score_adamw():
    """MaskScoreAdamW's one-launch step over BERT-base's 72 score matrices (4 x 768 x 768, 3072
    x 768, 768 x 3072 per layer; meta addresses are 0: the aligned path) and over a list with a
    numel that is not a multiple of 16 (the unaligned path), with fp32 and bf16 weights."""
    from regdrop_fast.triton_kernels import score_adamw as K

    bert = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (HIDDEN, FFN)]
    for shapes in (bert * 12, [(HIDDEN, HIDDEN), (3, 5)]):
        scores = [t(*shape, dtype=torch.float32) for shape in shapes]
        phis = [t(1, dtype=torch.float32) for _ in shapes]
        for w_dtype in (torch.float32, torch.bfloat16):
            weights = [t(*shape, dtype=w_dtype) for shape in shapes]
            for ste in (True, False):
                grads = [t(*shape) if ste else s for shape, s in zip(shapes, scores)]
                for write in (True, False):
                    table = K.MatrixTable(scores, scores, scores, weights,
                                          phis if write else [None] * len(shapes))
                    out = t(table.out_numel) if write else None
                    K.score_adamw_multi(table, grads, [1e-3] * len(shapes),
                                        [0.5] * len(shapes), out, decay=1.0, beta1=0.9,
                                        beta2=0.999, eps=1e-8, ste=ste)


def masked_adamw():
    """ChildTuning's Triton step (backend="triton": the GPU path where the extension has no
    CUDA kernels) over one BERT-base layer's tensors, Philox and packed masks mixed, at every
    dtype, action, update order and with/without capturable scalars."""
    from regdrop_fast.triton_kernels import masked_adamw as K

    shapes = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (HIDDEN, FFN), (HIDDEN,)]
    count = len(shapes)
    masks = [t(shape[0], HIDDEN // 32, dtype=torch.int32) if i % 2 else None
             for i, shape in enumerate(shapes)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        params = [t(*shape, dtype=dtype) for shape in shapes]
        state = [t(*shape, dtype=torch.float32) for shape in shapes]
        for action in (0, 1, 2):
            for paper in (False, True):
                for capturable in (None, (t((), dtype=torch.float32), 0.9, 0.999, 0.01)):
                    steps = ([t((), dtype=torch.float32) for _ in shapes] if capturable
                             else [3] * count)
                    K.masked_adamw_step(
                        params, params, state, state, masks=masks,
                        mask_kinds=[2 if m is not None else 1 for m in masks], steps=steps,
                        index_offsets=[0] * count, streams=list(range(count)),
                        step_sizes=[1e-3] * count, bc2_sqrts=[0.5] * count, beta1=0.9,
                        beta2=0.999, eps=1e-8, lr_wd=1e-5, seed=SEED, threshold=3 << 30,
                        inv_p=4 / 3, action=action, paper=paper, capturable=capturable)


LAUNCHERS = (philox_and_masks, rdrop, addrop_mask, masked_attention, masked_linear,
             mask_training, score_adamw, masked_adamw)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1])
        return 2
    spec = importlib.util.spec_from_file_location(
        "regdrop_triton_aot_record", os.path.join(os.path.dirname(__file__), "record.py"))
    record = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(record)
    record.install(argv[0])
    failed = 0
    for launcher in LAUNCHERS:
        try:
            launcher()
        except Exception:
            failed += 1
            print(f"FAIL dry run of {launcher.__name__} (update {__file__}):\n"
                  f"{traceback.format_exc(limit=-3)}")
    record.uninstall(argv[0])
    print(f"GPU dry run: {len(LAUNCHERS) - failed} of {len(LAUNCHERS)} launcher groups recorded")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
