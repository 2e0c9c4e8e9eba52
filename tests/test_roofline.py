"""The roofline model's arithmetic on shapes counted by hand, its derivation of the cuBLAS
composition from the torch backend's code, and its labelling as a model."""

from __future__ import annotations

import pytest

from benchmarks import roofline as R

# M=256 tokens, K=128 in, N=64 out, r=4 (padded to 16 in the MMAs), bf16
S = R.Shape(M=256, K=128, N=64, r=4)


def _by_name(launches):
    return {launch.name: launch for launch in launches}


def test_frozen_linear_by_hand():
    plan = R.frozen(S)
    (fwd,), (bwd,) = plan["fwd"], plan["bwd"]
    # x 256*128 + W 64*128 + y 256*64 = 57344 elements of 2 bytes; 2*256*64*128 FLOPs
    assert fwd.bytes == 114688 and fwd.flops == 4194304
    assert bwd.bytes == 114688 and bwd.flops == 4194304  # dy, W read; dx written


def test_derived_linear_matches_the_hand_count():
    # torch's own nn.Linear run on meta tensors under the launch counter
    derived = R.frozen_derived(S)
    assert [(k.bytes, k.flops) for k in derived["fwd"]] == [(114688, 4194304)]
    assert [(k.bytes, k.flops) for k in derived["bwd"]] == [(114688, 4194304)]


def test_composition_at_p0_by_hand():
    # the torch backend's forward: sA = s A; u = x (sA)^T; y = u B^T; y += x W^T (addmm_,
    # beta 1)
    plan = R.composition(S)
    got = [(k.name, k.bytes, k.flops) for k in plan["fwd"]]
    assert got == [
        ("mul.Tensor", 4 * 128 * 2 * 2, 0),
        ("mm", (256 * 128 + 4 * 128 + 256 * 4) * 2, 2 * 256 * 4 * 128),
        ("mm", (256 * 4 + 4 * 64 + 256 * 64) * 2, 2 * 256 * 64 * 4),
        ("addmm_", (256 * 64 + 256 * 128 + 64 * 128 + 256 * 64) * 2, 2 * 256 * 64 * 128),
    ]
    bwd_flops = sorted(k.flops for k in plan["bwd"] if k.flops)
    # g = dy B, dx = g A, dx += dy W, dA = g^T x, dB = u^T dy
    assert bwd_flops == sorted([2 * 256 * 4 * 64, 2 * 256 * 128 * 4, 2 * 256 * 128 * 64,
                                2 * 4 * 128 * 256, 2 * 4 * 64 * 256])


def test_composition_with_dropout_reads_more():
    plain, drop = R.composition(S), R.composition(R.Shape(256, 128, 64, 4, p=0.1))
    assert len(drop["fwd"]) > len(plain["fwd"])
    assert sum(k.bytes for k in drop["fwd"]) > sum(k.bytes for k in plain["fwd"]) + 256 * 128 * 2


def test_fused_by_hand():
    plan = R.fused(S)
    fwd = _by_name(plan["fwd"])
    shrink = fwd["shrink: u = s D(x) A^T"]
    assert shrink.bytes == (32768 + 512 + 1024) * 2  # x, A read; u written
    assert shrink.flops == 2 * 256 * 128 * 16  # rank padded to 16 in the MMA
    main = fwd["forward: y = x W^T + u B^T"]
    assert main.bytes == (32768 + 1024 + 256 + 16384 + 8192) * 2  # x, u, B, y; W
    assert main.flops == 2 * 256 * 64 * 128 + 2 * 256 * 64 * 16
    assert "seed: randint" not in fwd  # no RNG draw without dropout
    assert "seed: randint" in _by_name(R.fused(R.Shape(256, 128, 64, 4, p=0.1))["fwd"])


def test_fused_backward_by_hand():
    # the partial counts follow the row tiles the kernels pick for this shape
    pb = -(-256 // R.tile("dy", S, 1)[0])
    pa = -(-256 // R.tile("dx", S, 128)[0])
    dy, dx, reduce = R.fused(S)["bwd"]
    # dy [256, 64] and B read, u read, g written (bf16); dB partials [pb, 64, 4] fp32
    assert dy.bytes == (16384 + 256 + 2 * 1024) * 2 + pb * 64 * 4 * 4
    assert dy.flops == 2 * (2 * 256 * 64 * 16)  # g = dy B and dy^T u
    # dy, g, A, x read, dx written (bf16); W read; dA partials [pa, 4, 128] fp32
    assert dx.bytes == (16384 + 1024 + 512 + 2 * 32768) * 2 + 8192 * 2 + pa * 4 * 128 * 4
    assert dx.flops == 2 * 256 * 128 * 64 + 2 * (2 * 256 * 128 * 16)  # dy W; g A and g^T x
    assert reduce.bytes == (pa * 512 + pb * 256) * 4 + (512 + 256) * 2
    assert reduce.flops == 0


def test_tiles_come_from_the_gpu_tables_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    R.config.cache_clear()
    big = R.Shape(8192, 4096, 4096, 16)
    assert R.tile("forward", big, 4096)[0] >= 64  # not the interpreter's 32x32 tile
    import os

    assert os.environ["TRITON_INTERPRET"] == "1"  # restored


def test_launch_time_is_the_highest_ceiling():
    h100 = R.GPUS["H100"]
    mem = R.Launch("copy", bytes=3.35e12)  # one second of HBM3
    mma = R.Launch("gemm", bytes=1.0, flops=989.4e12 / 2)
    alu = R.Launch("decode", bytes=1.0, alu=67e12 / 2 * 3)  # FP32 FLOPS / 2 a second
    assert mem.seconds(h100) == pytest.approx(1.0) and mem.bound(h100) == "memory"
    assert mma.seconds(h100) == pytest.approx(0.5) and mma.bound(h100) == "tensor"
    assert alu.seconds(h100) == pytest.approx(3.0) and alu.bound(h100) == "alu"


def test_ratios_of_the_frozen_layer_are_one():
    s = R.Shape(8192, 4096, 4096, 16)
    assert R.ratios(R.frozen(s), s, R.GPUS["H200"]) == {"fwd": 1.0, "fwd+bwd": 1.0}


def test_fused_gemm_shape_is_compute_bound_and_near_the_floor():
    # Llama-7B q_proj: the fused forward's GEMM does 1 + 16/4096 of the frozen FLOPs
    s = R.Shape(8192, 4096, 4096, 16)
    fwd = _by_name(R.fused(s)["fwd"])["forward: y = x W^T + u B^T"]
    assert fwd.bound(R.GPUS["H100"]) == "tensor"
    assert fwd.flops / R.frozen(s)["fwd"][0].flops == pytest.approx(1 + 16 / 4096)


def test_nf4_bytes_per_element():
    assert R.Quant(64, False).bytes_per_element == 0.5 + 4 / 64  # fp32 absmax per 64
    # uint8 absmax per 64, and an fp32 absmax per 256 of those
    assert R.Quant(64, True).bytes_per_element == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))


def test_4bit_plans_by_hand():
    q = R.Quant(64, False)
    deq = R.frozen_4bit(S, q)["fwd"][0]
    assert deq.bytes == 64 * 128 * (0.5625 + 2)  # packed read, bf16 written
    fused4 = R.fused(S, base=q)
    dense = R.fused(S)
    for phase, name in (("fwd", "forward: y = x W^T + u B^T"),
                        ("bwd", "dx: dy W + (g A) m/(1-p), dA partials")):
        k4, k = _by_name(fused4[phase])[name], _by_name(dense[phase])[name]
        assert k.bytes - k4.bytes == 64 * 128 * (2 - 0.5625)  # W read packed
        assert k4.flops == k.flops
    bm = R.tile("forward", S, 64, "nf4")[0]  # the 4-bit forward's own tiles
    k4 = _by_name(fused4["fwd"])["forward: y = x W^T + u B^T"]
    assert k4.alu == R.DECODE_OPS * 64 * 128 * -(-256 // bm)  # once per CTA loading a tile
    comp4 = R.composition_4bit(S, q)
    assert len(comp4["bwd"]) == len(R.composition(S)["bwd"]) + 1  # dequantized again


def test_dora_adds_the_norm_pass_and_dm():
    lora, dora = R.fused(S), R.fused(S, adapter="dora")
    norm = dora["fwd"][0]
    assert norm.name.startswith("dora norm")
    assert norm.bytes == 64 * 128 * 2 + (512 + 256) * 2 + 2 * 64 * 4  # W, A, B; m, m/norm
    assert norm.flops == 2 * 64 * 128 * 16 + 2 * 4 * 16 * 128  # W A^T, A A^T (padded rank)
    fwd_d = _by_name(dora["fwd"])["forward: y = x W^T + u B^T, column scale, z stored"]
    fwd_l = _by_name(lora["fwd"])["forward: y = x W^T + u B^T"]
    assert fwd_d.bytes - fwd_l.bytes == 64 * 4 + 256 * 64 * 2  # the scale read, z written
    pb = -(-256 // R.tile("dy", S, 1)[0])
    extra_bwd = sum(k.bytes for k in dora["bwd"]) - sum(k.bytes for k in lora["bwd"])
    # the pre-scale output [256, 64] bf16 read in the dy pass; the scale read by dy and dx;
    # dm partials [pb, 64] fp32 written and summed; dm [64] written
    assert extra_bwd == 256 * 64 * 2 + 2 * 64 * 4 + 2 * pb * 64 * 4 + 64 * 4
    # p > 0: the second accumulators double the forward and dx GEMMs' MMAs
    d = R.Shape(256, 128, 64, 4, p=0.1)
    f = [k for k in R.fused(d, adapter="dora")["fwd"] if k.name.startswith("forward")][0]
    assert f.flops == 2 * (2 * 256 * 64 * 128) + 2 * 256 * 64 * 16


def test_dora_composition_is_derived_from_its_code():
    plan = R.composition_dora(S)
    fwd_flops = sum(k.flops for k in plan["fwd"])
    # at least the three GEMM-sized products of the torch path: x W^T, x A^T, u B^T
    assert fwd_flops >= 2 * 256 * 64 * 128 + 2 * 256 * 4 * 128 + 2 * 256 * 64 * 4
    # the backward reads dy and the saved z for dm, and dy again for dx: >= 3 [M, N] reads
    assert sum(k.bytes for k in plan["bwd"]) >= 3 * 256 * 64 * 2


def test_report_prints_the_model_beside_gpu_tables():
    from benchmarks import report

    meta = {"device": "cuda", "gpu": "NVIDIA H200", "date": "d", "torch": "t", "triton": "t",
            "peft": "p", "fastlora": "f", "git": "g", "dtype": "bfloat16", "timing": "do_bench"}
    lin = {"status": "ok", "ms": {m: {"median": 1.0, "n": None} for m in report.MODES},
           "ratio": {m: 1.0 for m in report.MODES}, "saved": {"extra": 0}, "check": {"ok": True}}
    case = {"M": 8192, "K": 4096, "N": 4096, "r": 16, "p": 0.0, "dtype": "bfloat16",
            "bias": False, "providers": {"linear": lin}}
    text = report.markdown({"meta": meta, "cases": [case]})
    assert "Roofline MODEL, not a measurement" in text
    row = [line for line in text.splitlines() if line.startswith("| 4096x4096 | 8192 | 16 | 0 |")]
    s = R.Shape(8192, 4096, 4096, 16)
    expected = R.ratios(R.fused(s), s, R.GPUS["H200"])
    assert row and f"{expected['fwd']:.3f} | {expected['fwd+bwd']:.3f}" in row[-1]
    assert "H100" not in text.split("Roofline MODEL")[1].split("\n")[2]  # only the H200 run


def test_cli_labels_itself_a_model(capsys):
    R.main(["--shapes", "256x512", "--m", "512", "--r", "8", "--p", "0",
            "--variants", "", "--launches", "256x512:512:8:0"])
    out = capsys.readouterr().out
    assert out.startswith("Roofline MODEL, not a measurement")
    assert "measured" not in out.lower().replace("not a measurement", "")
    for g in R.GPUS.values():
        assert g.name in out


# --------------------------------------------------------------------------- the band

BIG = R.Shape(8192, 4096, 4096, 16)
H100 = R.GPUS["H100"]


def test_pessimistic_launch_costs_by_hand():
    gemm = R.Launch("g", bytes=1.0, flops=989.4e12 * 1e-3, cost=R.Cost("gemm", "dx", 264))
    # 1 ms of MMAs at 0.9x, then two waves of 1.5 us epilogues on 132 SMs
    assert R.pessimistic_seconds(gemm, H100) == pytest.approx(1e-3 / 0.9 + 2 * 1.5e-6)
    filled = R.Launch("s", bytes=3.35e12 * 1e-3, cost=R.Cost("stream"))
    assert R.pessimistic_seconds(filled, H100) == pytest.approx(2e-3)  # capped at 50%
    # latency-bound: 1 MB in flight over 3.35 TB/s x 800 ns -> 37% of the peak
    occ = 1e6 / (3.35e12 * R.DRAM_LATENCY_S)
    thin = R.Launch("s", bytes=3.35e12 * 1e-3, cost=R.Cost("stream", inflight=1e6))
    assert R.pessimistic_seconds(thin, H100) == pytest.approx(1e-3 / occ)
    cublas = R.Launch("c", bytes=3.35e12 * 1e-3)
    assert R.pessimistic_seconds(cublas, H100) == cublas.seconds(H100)


def test_band_of_todays_kernels_and_the_best_pairing():
    pairs = R.band_pairs(BIG, H100)
    for opt, pess in pairs.values():
        assert pess >= opt - 1e-12  # the pessimistic line is never below the optimistic
    today = pairs["fused/fused"]
    assert 1.38 <= today[1] <= 1.55  # the static review: about 1.41x
    comp = pairs["composition/composition"]
    assert comp[0] == pytest.approx(comp[1])  # cuBLAS is the yardstick in both lines
    best = min(v[1] for v in pairs.values())
    assert best <= 1.30
    # the best pairing of fused candidates (hybrids included, no composition side) too: the band's goal for the kernels
    fused = R.band_pairs(BIG, H100, fused_only=True)
    assert min(v[1] for v in fused.values()) <= 1.30
    # with dropout the best fused pairing is below the composition's line
    drop = R.band_pairs(R.Shape(8192, 4096, 4096, 16, p=0.1), H100, fused_only=True)
    comp_drop = R.band_pairs(R.Shape(8192, 4096, 4096, 16, p=0.1), H100)["composition/composition"]
    assert min(v[1] for v in drop.values()) < comp_drop[1]


def test_candidates_follow_their_structure():
    from fastlora.kernels import api

    fwd, bwd = R.forward_candidates(BIG), R.backward_candidates(BIG)
    # the model times the dispatcher's own candidates on a dense base, by the same names
    assert set(fwd) == set(api.FORWARD_CANDIDATES) - api.CANDIDATES_4BIT_ONLY | {"composition"}
    assert set(bwd) == set(api.BACKWARD_CANDIDATES) - api.CANDIDATES_4BIT_ONLY | {"composition"}
    gemm = [k for k in bwd["dx_gemm"] if k.cost.kind == "gemm"][0]
    assert gemm.flops == 2.0 * 8192 * 4096 * (4096 + 16)  # the extra K step of width r
    assert gemm.cost.epilogue == ""  # p = 0: nothing after the mainloop but the store
    drop = [k for k in R.backward_candidates(R.Shape(8192, 4096, 4096, 16, p=0.1))["dx_gemm"]
            if k.cost.kind == "gemm"][0]
    assert drop.cost.epilogue == "dx" and drop.alu == R.PHILOX_OPS * 8192 * 4096
    # today's dy pass is latency-bound; the machine-filling one is not
    assert bwd["fused"][0].cost.inflight > 0 and bwd["split_dy"][0].cost.inflight == 0
    assert bwd["dx_gemm"][0].cost.inflight > 0  # it keeps today's dy pass
    assert len(bwd["dx_gemm"]) == len(bwd["split_dy"]) == 3  # dy pass, dx GEMM, tail


def test_hybrid_candidates_by_hand():
    """cublas_shrink and dx_gemm_cublas: their skinny GEMMs charged as cuBLAS, the Triton
    GEMMs they keep as the other candidates' (the same Launch), the dropout pass and the
    tail as Triton streams."""
    M, K, N, r = 8192, 4096, 4096, 16
    fwd, bwd = R.forward_candidates(BIG)["cublas_shrink"], R.backward_candidates(BIG)
    assert [k.name for k in fwd] == ["cuBLAS: u = s D(x) A^T", "forward: y = x W^T + u B^T"]
    assert fwd[0].bytes == (M * K + r * K + M * r) * 2 and fwd[0].flops == 2 * M * K * r
    assert fwd[0].cost.kind == "cublas" and fwd[1] == R.fused(BIG)["fwd"][-1]
    hyb = bwd["dx_gemm_cublas"]
    assert [k.cost.kind for k in hyb] == ["cublas", "cublas", "gemm", "cublas"]
    assert hyb[0].bytes == (M * N + N * r + M * r) * 2  # g = s dy B: dy read once
    assert hyb[1].bytes == (M * N + M * r + N * r) * 2  # dB = dy^T u
    assert hyb[3].bytes == (M * r + M * K + r * K) * 2  # dA = g^T x
    assert hyb[2] == bwd["dx_gemm"][1]  # dx_gemm's GEMM
    drop = R.Shape(M, K, N, 16, p=0.1)
    fwd_d = R.forward_candidates(drop)["cublas_shrink"]
    assert [k.name.split(":")[0] for k in fwd_d] == ["seed", "dropout pass", "cuBLAS",
                                                     "forward"]  # fmt: skip
    assert fwd_d[1].bytes == 2 * M * K * 2 and fwd_d[1].cost.kind == "stream"
    tail = R.backward_candidates(drop)["dx_gemm_cublas"][3]
    assert tail.name.startswith("tail") and tail.cost.kind == "stream"
    assert tail.bytes == (M * K + M * r + r * K) * 2  # x, g read; dA written (no dB)
    assert tail.alu == R.PHILOX_OPS * M * K  # the mask regenerated in registers
    # the band's estimate for the pairing: about 1.27x the frozen layer on an H100
    assert R.band_pairs(BIG, H100)["cublas_shrink/dx_gemm_cublas"][1] == pytest.approx(
        1.272, abs=0.005)


def test_warp_spec_is_the_fused_forward_on_its_own_tiles():
    fwd = R.forward_candidates(BIG)
    ws, fused = fwd["warp_spec"], fwd["fused"]
    assert [k.bytes for k in ws] == [k.bytes for k in fused]
    assert ws[-1].cost.tiles == (8192 // 128) * (4096 // 128)  # 128 x 128 tiles
    # no warp-specialized tile at r_pad 64 (shared memory): the fused launches themselves
    wide = R.Shape(8192, 4096, 4096, 64)
    assert R.forward_candidates(wide)["warp_spec"] == R.forward_candidates(wide)["fused"]


def test_cli_prints_the_band_labelled_a_model(capsys):
    R.main(["--shapes", "256x512", "--m", "512", "--r", "8", "--p", "0,0.1",
            "--variants", "", "--launches", "", "--band", "256x512"])
    out = capsys.readouterr().out
    assert "Roofline BAND, a MODEL, not a measurement" in out
    for pair in ("fused/fused", "dx_gemm", "composition/composition"):
        assert pair in out
    assert "best fused" in out and "(x the frozen layer; a model)" in out
