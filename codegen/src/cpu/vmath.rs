//! The transcendental functions on four lanes: [`crate::math::approx`]'s operation
//! sequences emitted as F32X4/I32X4 Cranelift instructions, one instruction per
//! operation, so each lane computes the same bits as the scalar functions the JIT's
//! scalar code calls and the interpreter runs.

use cranelift_codegen::ir::types::{F32X4, I32X4};
use cranelift_codegen::ir::{ConstantData, Endianness, InstBuilder, MemFlagsData, Value};
use cranelift_frontend::FunctionBuilder;

use super::translate::float_cc;
use crate::ir::{CmpOp, Unary};
use crate::math::approx::{self, Arith};

/// `op` on an F32X4 value, for the functions that are not single instructions.
pub(super) fn unary(b: &mut FunctionBuilder, op: Unary, x: Value) -> Option<Value> {
    let mut lanes = Lanes(b);
    Some(match op {
        Unary::Exp => approx::exp(&mut lanes, x),
        Unary::Log => approx::log(&mut lanes, x),
        Unary::Tanh => approx::tanh(&mut lanes, x),
        Unary::Erf => approx::erf(&mut lanes, x),
        Unary::Neg | Unary::Abs | Unary::Sqrt => return None,
    })
}

/// Emits each operation on four lanes.
struct Lanes<'a, 'f>(&'a mut FunctionBuilder<'f>);

impl Arith for Lanes<'_, '_> {
    type F = Value;
    type I = Value;
    /// An I32X4 lane mask.
    type M = Value;
    fn float(&mut self, c: f32) -> Value {
        let handle = self.0.func.dfg.constants.insert(lanes_of(c.to_le_bytes()));
        self.0.ins().vconst(F32X4, handle)
    }
    fn int(&mut self, c: i32) -> Value {
        let handle = self.0.func.dfg.constants.insert(lanes_of(c.to_le_bytes()));
        self.0.ins().vconst(I32X4, handle)
    }
    fn add(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().fadd(a, b)
    }
    fn sub(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().fsub(a, b)
    }
    fn mul(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().fmul(a, b)
    }
    fn div(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().fdiv(a, b)
    }
    fn abs(&mut self, a: Value) -> Value {
        self.0.ins().fabs(a)
    }
    fn cmp(&mut self, op: CmpOp, a: Value, b: Value) -> Value {
        self.0.ins().fcmp(float_cc(op), a, b)
    }
    fn select(&mut self, m: Value, a: Value, b: Value) -> Value {
        let m = self.0.ins().bitcast(F32X4, lane_order(), m);
        self.0.ins().bitselect(m, a, b)
    }
    fn to_bits(&mut self, a: Value) -> Value {
        self.0.ins().bitcast(I32X4, lane_order(), a)
    }
    fn of_bits(&mut self, a: Value) -> Value {
        self.0.ins().bitcast(F32X4, lane_order(), a)
    }
    fn to_float(&mut self, a: Value) -> Value {
        self.0.ins().fcvt_from_sint(F32X4, a)
    }
    fn iadd(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().iadd(a, b)
    }
    fn isub(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().isub(a, b)
    }
    fn and(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().band(a, b)
    }
    fn or(&mut self, a: Value, b: Value) -> Value {
        self.0.ins().bor(a, b)
    }
    fn shl(&mut self, a: Value, bits: u8) -> Value {
        self.0.ins().ishl_imm_s(a, i64::from(bits))
    }
    fn sshr(&mut self, a: Value, bits: u8) -> Value {
        self.0.ins().sshr_imm_s(a, i64::from(bits))
    }
}

/// A constant of four equal lanes, each `lane`'s bytes: one load from the constant pool
/// (a scalar constant and a `splat` are two instructions at every use).
fn lanes_of(lane: [u8; 4]) -> ConstantData {
    ConstantData::from(lane.repeat(4))
}

/// Flags for reinterpreting a lane mask as floats lane by lane.
pub(super) fn lane_order() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}
