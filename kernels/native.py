"""Calling compiled kernels through their addresses instead of linking them in.

When one numba function calls another, the callee's code is copied into the
caller's module, optimised and compiled to machine code again, and a parallel
loop's body is one more such level; train_epoch called the per-chunk kernels
from two parallel loops, so their code was compiled three times over (a cold
start spent half its 30 s there). Here a kernel is compiled on its own, the
caller receives its address at run time, and its arguments are packed once into
a block in the caller's frame: the parallel loop passes only the block's address
and the chunk number, so neither the caller's compiled code (nor its cache) nor
the loop body holds the kernel or its long argument list. Measured on
seed000's network with an empty cache (python -m bench.compile_time): 30.3 s to
the end of a first epoch before, 17.3 s after; train_epoch's own share of that
went from about 15.8 s to about 5 s (3.6 s of the rest had been the long
argument lists captured by the two parallel loop bodies).

An address is only valid for the argument types the kernel was compiled for.
Both sides derive a key from those types (signature_key); pack_call refuses to
pack (returns 0) when the caller's key differs from the one compiled into the
call site, so a mismatch is reported instead of jumping into code that reads
the wrong layout. Addresses are passed at run time and never stored in a cache:
each process asks its own numba for them (address()).
"""
import zlib

import numpy as np

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VOIDP = ir.IntType(8).as_pointer()


def signature_key(argtypes):
    """A number naming a kernel's argument types (numba types), the same in every
    process."""
    return zlib.crc32(repr(tuple(argtypes)).encode()) & 0x7FFFFFFF


def _trampoline(context, module, argtypes, rest_type, key):
    # int32 trampoline(block*, int64 t): calls block.kernel(t, *block.args) and
    # returns 0, or 1 when the kernel reported an error. One per argument list.
    name = f"fastmlp_native_trampoline_{key}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(_I32, [_VOIDP, _I64]), name=name)
    fn.linkage = "internal"
    b = ir.IRBuilder(fn.append_basic_block())
    block_ty = ir.LiteralStructType([_I64, context.get_value_type(rest_type)])
    blk = b.bitcast(fn.args[0], block_ty.as_pointer())
    zero = ir.Constant(_I32, 0)
    addr = b.load(b.gep(blk, [zero, zero]))
    rest = b.load(b.gep(blk, [zero, ir.Constant(_I32, 1)]))
    values = [fn.args[1]] + cgutils.unpack_tuple(b, rest, len(argtypes) - 1)
    fnty = context.call_conv.get_function_type(types.none, argtypes)
    status, _ = context.call_conv.call_function(b, b.inttoptr(addr, fnty.as_pointer()),
                                                types.none, argtypes, values)
    b.ret(b.select(status.is_error, ir.Constant(_I32, 1), zero))
    return fn


@intrinsic
def pack_call(typingctx, addr, key, args):
    """Pack a call of the kernel at address addr, whose arguments are (t,) + args
    with t an int64 and which returns None, into a block in the caller's frame
    (valid until the caller returns; args are stored as they are, so arrays must
    not be replaced in the meantime, only their contents). Returns
    (trampoline, block) for call_packed, or (0, 0) when key is not
    signature_key of those argument types.

    The block holds no reference to the arrays in args: each must stay alive by
    other means until the last call_packed, for numba frees an array the caller
    allocated once the caller no longer uses it (so an array allocated in the
    caller must also be used after the packed calls, or be the caller's
    argument)."""
    if not (isinstance(addr, types.Integer) and isinstance(key, types.Integer)):
        raise TypingError("pack_call: addr and key must be integers")
    if not isinstance(args, types.BaseTuple):
        raise TypingError("pack_call: args must be a tuple")
    argtypes = (types.int64,) + tuple(args)
    expected = signature_key(argtypes)

    def codegen(context, builder, signature, llargs):
        a = context.cast(builder, llargs[0], addr, types.int64)
        k = context.cast(builder, llargs[1], key, types.int64)
        tramp = _trampoline(context, builder.module, argtypes, args, expected)
        block = cgutils.alloca_once(builder, ir.LiteralStructType(
            [_I64, context.get_value_type(args)]))
        zero = ir.Constant(_I32, 0)
        builder.store(a, builder.gep(block, [zero, zero]))
        builder.store(llargs[2], builder.gep(block, [zero, ir.Constant(_I32, 1)]))
        ok = builder.icmp_signed("==", k, ir.Constant(_I64, expected))
        null = ir.Constant(_I64, 0)
        return context.make_tuple(builder, signature.return_type, [
            builder.select(ok, builder.ptrtoint(tramp, _I64), null),
            builder.select(ok, builder.ptrtoint(block, _I64), null)])

    return types.UniTuple(types.int64, 2)(addr, key, args), codegen


@intrinsic
def call_packed(typingctx, tramp, block, t):
    """Run a call packed by pack_call, for chunk t; returns False when the kernel
    reported an error (it raised)."""
    for name, v in (("tramp", tramp), ("block", block), ("t", t)):
        if not isinstance(v, types.Integer):
            raise TypingError(f"call_packed: {name} must be an integer")

    def codegen(context, builder, signature, llargs):
        fnty = ir.FunctionType(_I32, [_VOIDP, _I64])
        fn = builder.inttoptr(context.cast(builder, llargs[0], tramp, types.int64),
                              fnty.as_pointer())
        blk = builder.inttoptr(context.cast(builder, llargs[1], block, types.int64), _VOIDP)
        code = builder.call(fn, [blk, context.cast(builder, llargs[2], t, types.int64)])
        return builder.icmp_signed("==", code, ir.Constant(_I32, 0))

    return types.boolean(tramp, block, t), codegen


@intrinsic
def call_at(typingctx, fn, args):
    """Call the kernel whose (address, signature key) fn holds (a 1-D int64 array of
    two, from address()) with the arguments args (a tuple; the kernel returns None).
    Returns False when key is not signature_key of args' types (the kernel is then
    not called) or when the kernel reported an error (it raised)."""
    if not (isinstance(fn, types.Array) and fn.ndim == 1 and fn.dtype == types.int64):
        raise TypingError("call_at: fn must be a 1-D int64 array (address, key)")
    if not isinstance(args, types.BaseTuple):
        raise TypingError("call_at: args must be a tuple")
    argtypes = tuple(args)
    expected = signature_key(argtypes)

    def codegen(context, builder, signature, llargs):
        arr = context.make_array(fn)(context, builder, llargs[0])
        addr = builder.load(builder.gep(arr.data, [ir.Constant(_I64, 0)]))
        key = builder.load(builder.gep(arr.data, [ir.Constant(_I64, 1)]))
        values = cgutils.unpack_tuple(builder, llargs[1], len(argtypes))
        done = cgutils.alloca_once_value(builder, cgutils.false_bit)
        with builder.if_then(builder.icmp_signed("==", key, ir.Constant(_I64, expected))):
            fnty = context.call_conv.get_function_type(types.none, argtypes)
            status, _ = context.call_conv.call_function(
                builder, builder.inttoptr(addr, fnty.as_pointer()), types.none, argtypes, values)
            builder.store(builder.not_(status.is_error), done)
        return builder.load(done)

    return types.boolean(fn, args), codegen


_ADDRESSES = {}


def _type_key(v):
    # At least as fine as numba's type of v for the values the Engine passes
    # (arrays, tuples of them, Python and NumPy scalars), and 50x cheaper than
    # numba.typeof over the epoch's ~45 arguments (1 ms a call).
    if isinstance(v, tuple):
        return (tuple,) + tuple(_type_key(x) for x in v)
    if isinstance(v, np.ndarray):
        f = v.flags
        return (np.ndarray, v.dtype.str, v.ndim, f.c_contiguous, f.f_contiguous, f.writeable,
                f.aligned)
    return (type(v),)


def address(dispatcher, args):
    """(address, key) of the njit function dispatcher compiled for the types of
    the values args (compiled now, or loaded from numba's cache), for pack_call.
    Remembered for the rest of the process, per dispatcher and argument types."""
    memo = (dispatcher, _type_key(args))
    found = _ADDRESSES.get(memo)
    if found is None:
        import numba
        sig = tuple(numba.typeof(a) for a in args)
        dispatcher.compile(sig)
        cres = dispatcher.overloads[sig]
        found = (cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name),
                 signature_key(sig))
        _ADDRESSES[memo] = found
    return found
