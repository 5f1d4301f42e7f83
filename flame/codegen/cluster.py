"""Thread block clusters (sm_90) for the generated kernels, as Numba intrinsics written in
inline PTX (numba-cuda has no cluster API): the cluster barrier, split into arrive and wait,
and a load from another block's shared memory (distributed shared memory). The blocks that
share one long row combine their partial reductions with them (cuda.py, row_parts)."""
from llvmlite import ir
from numba import types
from numba.cuda import cgutils
from numba.cuda.extending import intrinsic

# Not the .aligned forms: those require every thread of a warp to execute the same barrier
# instruction, which the compiler need not keep after the guarded loops before them.
ARRIVE = "barrier.cluster.arrive.release;"    # what this thread wrote is published ...
WAIT = "barrier.cluster.wait.acquire;"        # ... to every thread that waits after arriving


def _barrier(text):
    def codegen(context, builder, sig, args):
        builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), text, "~{memory}", side_effect=True), [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def cluster_sync(typingctx):
    """Every thread of every block of the cluster arrives before any goes on; what each wrote
    before it (shared or global memory) is visible to all after it."""
    return _barrier(ARRIVE + "\n\t" + WAIT)


@intrinsic
def cluster_arrive(typingctx):
    """The first half of cluster_sync: work may go on until the matching cluster_wait."""
    return _barrier(ARRIVE)


@intrinsic
def cluster_wait(typingctx):
    return _barrier(WAIT)


# numba type -> (PTX load type, inline asm register constraint, LLVM type)
_LOAD = {types.float32: ("f32", "f", ir.FloatType()), types.float64: ("f64", "d", ir.DoubleType()),
         types.int32: ("s32", "r", ir.IntType(32)), types.int64: ("s64", "l", ir.IntType(64))}


@intrinsic
def cluster_load(typingctx, arr, index, rank):
    """arr[index] in the shared memory of block `rank` of this cluster (arr: a 1-D shared
    array of float32, float64, int32 or int64). The owner must have written it before a
    cluster barrier that this thread has waited on."""
    if not isinstance(arr, types.Array) or arr.dtype not in _LOAD:
        return None
    ptx_type, reg, llty = _LOAD[arr.dtype]

    def codegen(context, builder, sig, args):
        aty, ity, rty = sig.args
        a, i, r = args
        ary = context.make_array(aty)(context, builder, a)
        i = context.cast(builder, i, ity, types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aty, ary, [i], wraparound=False)
        i64 = ir.IntType(64)
        addr = builder.ptrtoint(ptr, i64)   # a generic address: mapa maps it to the other block's
        r = builder.trunc(context.cast(builder, r, rty, types.int64), ir.IntType(32))
        mapa = ir.InlineAsm(ir.FunctionType(i64, [i64, ir.IntType(32)]), "mapa.u64 $0, $1, $2;", "=l,l,r")
        remote = builder.call(mapa, [addr, r])
        # volatile, so the load stays after the barrier that published the value
        load = ir.InlineAsm(ir.FunctionType(llty, [i64]), f"ld.{ptx_type} $0, [$1];", f"={reg},l", side_effect=True)
        return builder.call(load, [remote])
    return arr.dtype(arr, index, rank), codegen
