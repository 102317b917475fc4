"""The kernels compile for an H100 (sm_90) even where no GPU is present.

The interpreter runs the kernels' Python semantics, not Triton's compiler, so code it accepts
can still fail to compile for a GPU. Compiling ahead of time for sm_90 (Triton ships ptxas)
catches that here, and checks that the products reach the tensor cores (wgmma/mma). The
compile runs in a child process: this test session has TRITON_INTERPRET=1 set (conftest),
under which ``@triton.jit`` yields interpreter objects that cannot be compiled.
"""
import os
import subprocess
import sys

import pytest

GEOMETRY = dict(KD=3, KH=3, KW=3, SD=2, SH=2, SW=2, PD=1, PH=1, PW=1)
BLOCKS = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)
INDEX = "*i64"  # LandmarkPartition.order / offsets are long tensors
KERNELS = {  # kernel name -> (pointer argument types, extra constexprs)
    "_forward_kernel": ({"x_ptr": "*bf16", "w_ptr": "*fp32", "r_ptr": "*fp32", "bias_ptr": "*fp32",
                         "y_ptr": "*bf16", "order_ptr": INDEX, "offsets_ptr": INDEX},
                        {"HAS_BIAS": True}),
    "_grad_input_kernel": ({"dy_ptr": "*bf16", "w_ptr": "*fp32", "r_ptr": "*fp32", "dx_ptr": "*bf16",
                            "order_ptr": INDEX, "offsets_ptr": INDEX}, {}),
    "_grad_mixed_kernel_kernel": ({"dy_ptr": "*bf16", "x_ptr": "*bf16", "gw_ptr": "*fp32",
                                   "order_ptr": INDEX, "offsets_ptr": INDEX}, {}),
}


def compile_for_sm90(name: str) -> str:
    """PTX of one kernel compiled for sm_90 (bf16, stride 2, padding 1); run without the interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from drasclr.kernels import loc_cond_conv3d

    fn = getattr(loc_cond_conv3d, name).fn  # the JITFunction under the autotuner
    pointers, extra = KERNELS[name]
    constexprs = dict(GEOMETRY, **BLOCKS, **extra, DOT_PRECISION="ieee", UPCAST_BF16=False)
    signature = {arg: "constexpr" if arg in constexprs else pointers.get(arg, "i32")
                 for arg in fn.arg_names}
    positions = {(fn.arg_names.index(arg),): value for arg, value in constexprs.items()}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=positions),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    return compiled.asm["ptx"]


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_compiles_for_sm90_with_tensor_cores(name):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{name} does not compile for sm_90:\n{result.stderr[-3000:]}"
    assert result.stdout.split() == ["tensor-cores"], f"{name}: no wgmma/mma in the PTX"


if __name__ == "__main__":
    ptx = compile_for_sm90(sys.argv[1])
    print("tensor-cores" if "wgmma" in ptx or "mma.sync" in ptx else "no-tensor-cores")
