"""Record the Triton launches the library makes on a GPU, without a GPU.

    python tools/triton_aot/gpu_launches.py launches.jsonl

Under the interpreter the launchers pick small CPU tiles, so a recorded test run misses the
specializations a GPU compiles (bf16 tensor-core tiles, streamed paths, more warps). This
script calls each launcher in triton_kernels/ on meta-device tensors of BERT-base-like shapes
with record.py installed: the launcher takes its non-CPU branch, and the recorder appends the
launch (or, for an autotuned kernel, each config) without running it. compile.py then
compiles the file. A launcher that cannot be dry-run this way fails the script with the
reason: update the call here when a launcher's signature changes.
"""
import importlib.util
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

META = torch.device("meta")
B, H, L, D, HIDDEN, FFN, VOCAB = 8, 12, 128, 64, 768, 3072, 30522
SEED = 0x0123456789ABCDEF  # low half >= 2**31: the i64 specialization of the seed halves


def t(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device=META)


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
        for rows, vocab in ((B * L, VOCAB), (32, 2)):  # token LM head, sentence classifier
            z = t(rows, vocab, dtype=dtype)
            K.rdrop_forward(z, z, t(rows, dtype=torch.int64), 1.0, -100, True,
                            t(1, dtype=torch.float32), True)
            K.rdrop_forward(z, z, None, 1.0, -100, False, t(1, dtype=torch.float32), False)
            K.rdrop_scale_grads_(z, z, t(rows, dtype=torch.float32))


def addrop_mask():
    from regdrop_fast.triton_kernels import addrop_mask as K

    for dtype in (torch.bfloat16, torch.float32):
        for lk in (L, 4096):  # resident row, streamed row
            kpm, rank = t(B, lk, dtype=torch.bool), t(B, dtype=torch.int32)
            K.keep_mask_bits(t(B, H, L, lk, dtype=dtype), None, kpm, rank, 3 << 30, SEED, 2, 0,
                             False)
            K.keep_mask_bits(t(B, H, L, D, dtype=dtype), t(B, H, lk, D, dtype=dtype), None,
                             rank, 3 << 30, SEED, 2, 0, True)


def masked_attention():
    from regdrop_fast.triton_kernels import masked_attention as K

    for dtype, d in ((torch.bfloat16, D), (torch.bfloat16, 128), (torch.float32, D)):
        q = t(B, H, L, d, dtype=dtype)
        lse = t(B, H, L, dtype=torch.float32)
        dummy = t(1, dtype=torch.uint8)
        for masks, p in ((K.MaskArgs(t(B, H, L, L // 32, dtype=torch.int32),
                                     t(B, L, dtype=torch.bool), None, dummy), 0.1),
                         (K.MaskArgs(None, None, t(B, 1, 1, L, dtype=dtype), dummy), 0.0)):
            K.masked_attention_forward(q, q, q, masks, d ** -0.5, p, SEED, 5, 2)
            K.masked_attention_backward(q, q, q, q, q, lse, masks, d ** -0.5, p, SEED, 5, 2)


def masked_linear():
    from regdrop_fast.triton_kernels import masked_linear as K

    x, w, dy = t(B * L, HIDDEN), t(FFN, HIDDEN), t(B * L, FFN)
    words, phi = t(FFN, HIDDEN // 32, dtype=torch.int32), t(1, dtype=torch.float32)
    scores = t(FFN, HIDDEN, dtype=torch.float32)
    K.masked_linear_forward(x, w, t(FFN), words, None, None)
    K.masked_linear_forward(x, w, None, None, scores, phi)
    K.masked_linear_backward_input(dy, w, words, None, None)
    K.masked_linear_backward_weight(dy, x, w, None, scores, phi, True, True)


LAUNCHERS = (philox_and_masks, rdrop, addrop_mask, masked_attention, masked_linear)


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
