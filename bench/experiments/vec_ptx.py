"""128-bit and 64-bit global loads and stores of float32 as inline PTX (an experiment: does a
row kernel gain from vector memory instructions?)."""
from llvmlite import ir
from numba import types
from numba.cuda.extending import intrinsic


def _addr(builder, ptr, index):
    i64 = ir.IntType(64)
    p = builder.gep(ptr, [builder.sext(index, i64) if index.type.width < 64 else index])
    return builder.ptrtoint(p, i64)


def _ld(width):
    regs = ",".join(f"${k}" for k in range(width))

    def typer(typingctx, ptr, index):
        def codegen(context, builder, sig, args):
            f = ir.FloatType()
            st = ir.LiteralStructType([f] * width)
            text = ("{ .reg .u64 g; cvta.to.global.u64 g, $" + str(width) + "; ld.global.v" + str(width) +
                    ".f32 {" + regs + "}, [g]; }")
            asm = ir.InlineAsm(ir.FunctionType(st, [ir.IntType(64)]), text, ",".join(["=f"] * width) + ",l")
            v = builder.call(asm, [_addr(builder, args[0], args[1])])
            return context.make_tuple(builder, sig.return_type, [builder.extract_value(v, k) for k in range(width)])
        return types.UniTuple(types.float32, width)(ptr, index), codegen
    return typer


def _st(width):
    regs = ",".join(f"${k + 1}" for k in range(width))

    def typer(typingctx, ptr, index, *vals):
        def codegen(context, builder, sig, args):
            f = ir.FloatType()
            text = ("{ .reg .u64 g; cvta.to.global.u64 g, $0; st.global.v" + str(width) + ".f32 [g], {" + regs + "}; }")
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [ir.IntType(64)] + [f] * width), text,
                               "l" + ",f" * width + ",~{memory}", side_effect=True)
            builder.call(asm, [_addr(builder, args[0], args[1])] + list(args[2:]))
            return context.get_dummy_value()
        return types.void(ptr, index, *vals), codegen
    return typer


ld2, ld4 = intrinsic(_ld(2)), intrinsic(_ld(4))


@intrinsic
def st2(typingctx, ptr, index, a, b):
    return _st(2)(typingctx, ptr, index, a, b)


@intrinsic
def st4(typingctx, ptr, index, a, b, c, d):
    return _st(4)(typingctx, ptr, index, a, b, c, d)
