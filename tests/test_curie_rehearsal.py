"""bench/curie_rehearsal.py's choice of compute dtype: bf16 only where the CPU multiplies bf16 natively."""
from bench.curie_rehearsal import native_bf16

ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\nbugs\t\t: sysret_ss_attrs\n"
ZEN5 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"


def test_native_bf16_reads_the_cpu_flags():
    assert native_bf16("cpu", ZEN3) == (False, "CPU without avx512_bf16 / amx_bf16")
    assert native_bf16("cpu", ZEN5) == (True, "CPU flags avx512_bf16")
    assert native_bf16("cpu", SAPPHIRE) == (True, "CPU flags amx_bf16")
    # a flag's name inside another word, or on a line that is not the flags line, does not count
    assert native_bf16("cpu", "model name\t: avx512_bf16 emulator\nflags\t\t: avx2 xavx512_bf16\n")[0] is False
