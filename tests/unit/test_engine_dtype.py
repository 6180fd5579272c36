"""`model.dtype: auto` on a CPU: bfloat16 only where the CPU computes it natively."""

from __future__ import annotations

from genrun.worker.engine import cpu_dtype

AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_a_cpu_without_native_bfloat16_runs_float32() -> None:
    assert cpu_dtype(AVX2) == "float32"
    assert cpu_dtype(AVX2.replace("avx2", "avx2 avx512f avx512bw")) == "float32"  # AVX-512 alone emulates it too


def test_a_cpu_with_avx512_bf16_or_amx_runs_bfloat16() -> None:
    assert cpu_dtype(AVX2.replace("avx2", "avx2 avx512f avx512_bf16")) == "bfloat16"
    assert cpu_dtype(AVX2.replace("avx2", "avx2 amx_tile amx_bf16")) == "bfloat16"


def test_the_flag_is_matched_whole_not_as_a_substring() -> None:
    assert cpu_dtype(AVX2.replace("avx2", "avx2 avx512_bf16x")) == "float32"
    assert cpu_dtype("model name\t: avx512_bf16 in a name\n" + AVX2) == "float32"
