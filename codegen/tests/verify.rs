//! The verifier: one failing kernel per invariant, with the message it must give, and the
//! bounds proof accepting exactly what guards make safe.

mod common;

use common::*;
use pdgc_codegen::analysis::launch::grid_independent;
use pdgc_codegen::ir::*;
use pdgc_codegen::verify::verify;

/// Asserts that `k` fails verification with one message containing each of `expected`.
fn rejects(k: &Kernel, expected: &[&str]) {
    let err = match verify(k) {
        Ok(()) => panic!("kernel `{}` verified, but it should not:\n{k}", k.name),
        Err(e) => e,
    };
    assert_eq!(err.kernel, k.name);
    for want in expected {
        assert!(err.errors.iter().any(|e| e.contains(want)), "no message contains {want:?}; messages:\n{err}");
    }
}

fn accepts(k: &Kernel) {
    if let Err(e) = verify(k) {
        panic!("{e}\n{k}");
    }
}

/// `y[i] = x[index(i)]` for `i` in `0..n`, buffers of `len` elements, optionally guarded.
fn gather(n: u32, len: u32, index: impl Fn(VarId) -> Affine, guard: Option<Cond>) -> Kernel {
    let mut kb = KernelBuilder::new("gather");
    let x = kb.input("x", &[f(len)]);
    let y = kb.output("y", &[f(n)]);
    let [g, i] = [kb.var("g"), kb.var("i")];
    let st = store(y, vec![v(i)], ld(x, vec![index(i)]));
    let inner = match guard {
        Some(cond) => vec![when(cond, vec![st])],
        None => vec![st],
    };
    kb.finish(g, Extent::Fixed(1), vec![lp(i, n, inner)])
}

/// A well-formed kernel to break in the tests below:
/// `grid n in 0..B { s = 0; for i in 0..4 { s = s + x[n, i] }; y[n] = s }`.
fn base() -> Kernel {
    let mut kb = KernelBuilder::new("base");
    let x = kb.input("x", &[B, f(4)]);
    let y = kb.output("y", &[B]);
    let [n, i] = [kb.var("n"), kb.var("i")];
    let s = kb.acc("s");
    kb.finish(
        n,
        Extent::Batch,
        vec![set(s, c(0.0)), lp(i, 4, vec![add_to(s, ld(x, vec![v(n), v(i)]))]), store(y, vec![v(n)], acc(s))],
    )
}

fn loop_body(k: &mut Kernel) -> &mut Vec<Stmt> {
    match &mut k.grid.body[1] {
        Stmt::Loop(l) => &mut l.body,
        _ => unreachable!("base() has its loop second"),
    }
}

#[test]
fn the_base_kernel_verifies() {
    accepts(&base());
}

#[test]
fn ids_must_be_in_range() {
    let mut k = base();
    k.grid.body[2] = store(ArgId(5), vec![v(VarId(0))], acc(AccId(0)));
    rejects(&k, &["argument 5 is out of range (2 arguments)"]);

    let mut k = base();
    loop_body(&mut k)[0] = add_to(AccId(0), ld(ArgId(0), vec![v(VarId(0)), v(VarId(9))]));
    rejects(&k, &["variable v9 is out of range (2 variables)"]);

    let mut k = base();
    if let Stmt::Loop(l) = &mut k.grid.body[1] {
        l.var = VarId(7);
    }
    rejects(&k, &["loop variable v7 is out of range", "variable `i` is never bound by a loop"]);

    let mut k = base();
    k.grid.body[0] = set(AccId(3), c(0.0));
    k.grid.body[2] = store(ArgId(1), vec![v(VarId(0))], acc(AccId(4)));
    rejects(&k, &["accumulator a3 is out of range (1 accumulators)", "accumulator a4 is out of range"]);
}

#[test]
fn each_variable_is_bound_by_exactly_one_loop() {
    // Shadowing: the inner loop binds `i` again.
    let mut k = base();
    let inner = loop_body(&mut k).remove(0);
    loop_body(&mut k).push(lp(VarId(1), 2, vec![inner]));
    rejects(&k, &["in `for i in 0..2`: variable `i` is bound by more than one loop"]);

    // A sibling loop reusing `i`.
    let mut k = base();
    let again = k.grid.body[1].clone();
    k.grid.body.insert(2, again);
    rejects(&k, &["variable `i` is bound by more than one loop"]);

    // The grid variable bound again inside.
    let mut k = base();
    if let Stmt::Loop(l) = &mut k.grid.body[1] {
        l.var = VarId(0);
    }
    rejects(&k, &["variable `n` is bound by more than one loop", "variable `i` is never bound by a loop"]);

    // A declared variable that no loop binds.
    let mut k = base();
    k.vars.push("spare".into());
    rejects(&k, &["variable `spare` is never bound by a loop"]);
}

#[test]
fn index_variables_must_be_bound_by_an_enclosing_loop() {
    // `i` is read after its loop ended.
    let mut k = base();
    k.grid.body[2] = store(ArgId(1), vec![v(VarId(0))], ld(ArgId(0), vec![v(VarId(0)), v(VarId(1))]));
    rejects(&k, &["in `y[n] = x[n, i]`: variable `i` is used outside any loop that binds it"]);
    // Also in `Expr::Index` and in conditions.
    let mut k = base();
    k.grid.body[2] =
        when(in_range(v(VarId(1)), 0, 2), vec![store(ArgId(1), vec![v(VarId(0))], Expr::Index(v(VarId(1))))]);
    rejects(
        &k,
        &["in `if 0 <= i < 2`: variable `i` is used outside", "in `y[n] = float(i)`: variable `i` is used outside"],
    );
}

#[test]
fn the_batch_dim_may_only_be_first() {
    let mut k = base();
    k.args[0].dims = vec![f(4), B];
    rejects(&k, &["argument `x`: the batch dim is dim 1; it may only be the first"]);
}

/// Private memory is one grid iteration's: no batch dim, and its accesses proved in bounds
/// in each iteration's slice. It never stands in the way of splitting the grid.
#[test]
fn private_arguments_are_per_iteration() {
    let mut kb = KernelBuilder::new("private");
    let x = kb.input("x", &[B, f(4)]);
    let t = kb.arg("t", &[f(4)], Mode::Private);
    let y = kb.output("y", &[B, f(4)]);
    let [n, i, j] = [kb.var("n"), kb.var("i"), kb.var("j")];
    let body = vec![
        lp(i, 4, vec![store(t, vec![v(i)], ld(x, vec![v(n), v(i)]))]),
        lp(j, 4, vec![store(y, vec![v(n), v(j)], ld(t, vec![Affine::constant(3).plus(j, -1)]))]),
    ];
    let k = kb.finish(n, Extent::Batch, body);
    accepts(&k);
    assert!(grid_independent(&k));
    let mut batched = k.clone();
    batched.args[1].dims = vec![B, f(4)];
    rejects(&batched, &["private argument `t` has a batch dim"]);
    let mut past_the_end = k.clone();
    let Stmt::Loop(l) = &mut past_the_end.grid.body[1] else { unreachable!("a loop") };
    let Stmt::Store { value: Expr::Load { index, .. }, .. } = &mut l.body[0] else { unreachable!("a store") };
    index[0] = Affine::constant(4).plus(j, -1);
    rejects(&past_the_end, &["index 1 of `t` (`-j+4`) ranges over [1, 4], outside the dim 0..4"]);
}

#[test]
fn huge_buffers_are_rejected() {
    let mut k = base();
    k.args[0].dims = vec![B, f(1 << 21), f(1 << 21)];
    rejects(&k, &["argument `x` has 4398046511104 elements per example; at most 2^40 are supported"]);
}

#[test]
fn accesses_match_dims_and_modes() {
    let mut k = base();
    loop_body(&mut k)[0] = add_to(AccId(0), ld(ArgId(0), vec![v(VarId(1))]));
    rejects(&k, &["in `s = (s + x[i])`: `x` has 2 dims but is indexed with 1"]);

    // Loads from an `out` argument, stores to an `in` one.
    let mut k = base();
    k.grid.body[2] = store(ArgId(0), vec![v(VarId(0)), Affine::constant(0)], ld(ArgId(1), vec![v(VarId(0))]));
    rejects(&k, &["loads from `y`, an `out` argument", "stores to `x`, an `in` argument"]);

    // `InOut` allows both.
    let mut k = base();
    k.args[1].mode = Mode::InOut;
    k.grid.body[2] = store(ArgId(1), vec![v(VarId(0))], Expr::add(ld(ArgId(1), vec![v(VarId(0))]), acc(AccId(0))));
    accepts(&k);
}

#[test]
fn accumulators_are_set_before_they_are_read() {
    // The first `Set` reads its own accumulator.
    let mut k = base();
    k.grid.body.remove(0);
    rejects(&k, &["in `s = (s + x[n, i])`: accumulator `s` is read before any `Set` of it"]);

    // A `Set` earlier in program order counts, even inside a loop or an `if`.
    let mut k = base();
    k.grid.body[0] = when(in_range(v(VarId(0)), 0, 1), vec![set(AccId(0), c(1.0))]);
    accepts(&k);

    // A `Set` later in program order does not.
    let mut k = base();
    let first = k.grid.body.remove(0);
    k.grid.body.push(first);
    rejects(&k, &["accumulator `s` is read before any `Set` of it"]);
}

#[test]
fn divisors_must_be_positive() {
    for div in [0, -2] {
        let k = gather(4, 4, |i| Affine::default().plus_div(i, 1, div), None);
        rejects(&k, &[&format!("a term of `i` divides by {div}; divisors must be positive")]);
    }
}

#[test]
fn unguarded_out_of_bounds_accesses_are_rejected() {
    // x[i+1] over a buffer of 4.
    let k = gather(4, 4, |i| v(i).offset(1), None);
    rejects(&k, &["in `y[i] = x[i+1]`: index 0 of `x` (`i+1`) ranges over [1, 4], outside the dim 0..4"]);
    // x[i-1] reads before the start.
    rejects(&gather(4, 4, |i| v(i).offset(-1), None), &["ranges over [-1, 2]"]);
    // Reversal x[3-i] is fine, x[4-i] is not.
    accepts(&gather(4, 4, |i| Affine::constant(3).plus(i, -1), None));
    rejects(&gather(4, 4, |i| Affine::constant(4).plus(i, -1), None), &["ranges over [1, 4]"]);
    // Floor division: x[⌊i/3⌋] over 4 elements is fine for i < 12, not for i < 13.
    accepts(&gather(12, 4, |i| Affine::default().plus_div(i, 1, 3), None));
    rejects(&gather(13, 4, |i| Affine::default().plus_div(i, 1, 3), None), &["ranges over [0, 4]"]);
    // Stores are checked too.
    let mut k = gather(4, 4, v, None);
    if let Stmt::Loop(l) = &mut k.grid.body[0] {
        l.body[0] = store(ArgId(1), vec![v(VarId(1)).offset(2)], c(0.0));
    }
    rejects(&k, &["in `y[i+2] = 0.0`: index 0 of `y` (`i+2`) ranges over [2, 5]"]);
}

#[test]
fn guards_make_the_same_access_safe() {
    let shifted = |i: VarId| v(i).offset(1);
    // Unguarded: rejected; guarded by `0 <= i+1 < 4`: accepted.
    rejects(&gather(4, 4, shifted, None), &["ranges over [1, 4]"]);
    accepts(&gather(4, 4, shifted, Some(in_range(v(VarId(1)).offset(1), 0, 4))));
    // As one conjunct of an `And`, and nested `And`s.
    let other = || cmp(CmpOp::Gt, c(1.0), c(0.0));
    accepts(&gather(4, 4, shifted, Some(Cond::And(vec![other(), in_range(v(VarId(1)).offset(1), 0, 4)]))));
    accepts(&gather(4, 4, shifted, Some(Cond::And(vec![Cond::And(vec![in_range(v(VarId(1)).offset(1), 0, 4)])]))));
    // A guard on the index shifted by a constant: `1 <= i < 5` bounds `i+1` to [2, 4]...
    rejects(
        &gather(4, 4, shifted, Some(in_range(v(VarId(1)), 1, 5))),
        &["ranges over [2, 4] even under the enclosing guards"],
    );
    // ...and `-1 <= i < 3` to [0, 3].
    accepts(&gather(4, 4, shifted, Some(in_range(v(VarId(1)), -1, 3))));
    // Terms in another order with like terms split still match.
    let split = |i: VarId| Affine::default().plus(i, 2).plus(i, -1).offset(1);
    accepts(&gather(4, 4, split, Some(in_range(v(VarId(1)).offset(1), 0, 4))));
    // A guard with the wrong bound does not help.
    rejects(&gather(4, 4, shifted, Some(in_range(v(VarId(1)).offset(1), 0, 5))), &["ranges over [1, 4]"]);
    // A guard on a different index does not help.
    rejects(&gather(4, 4, shifted, Some(in_range(v(VarId(0)).offset(1), 0, 4))), &["ranges over [1, 4]"]);
    // A guard that is never true makes the access unreachable.
    accepts(&gather(4, 4, |i| v(i).offset(100), Some(in_range(v(VarId(1)), 3, 2))));
    // So does a constant guard that fails, over a constant index (an unrolled tap in the
    // padding), while one that holds bounds it.
    accepts(&gather(4, 4, |_| Affine::constant(-1), Some(in_range(Affine::constant(-1), 0, 4))));
    accepts(&gather(4, 4, |_| Affine::constant(2), Some(in_range(Affine::constant(1), 0, 4))));
    rejects(&gather(4, 4, |_| Affine::constant(4), Some(in_range(Affine::constant(3), 0, 4))), &["ranges over [4, 4]"]);
}

#[test]
fn select_conditions_do_not_guard() {
    // Both arms of a `Select` may be evaluated, so its condition proves nothing.
    let mut kb = KernelBuilder::new("select");
    let x = kb.input("x", &[f(4)]);
    let y = kb.output("y", &[f(4)]);
    let [g, i] = [kb.var("g"), kb.var("i")];
    let value = Expr::select(in_range(v(i).offset(1), 0, 4), ld(x, vec![v(i).offset(1)]), c(0.0));
    let k = kb.finish(g, Extent::Fixed(1), vec![lp(i, 4, vec![store(y, vec![v(i)], value)])]);
    rejects(&k, &["ranges over [1, 4], outside the dim 0..4"]);
}

#[test]
fn a_padded_convolution_needs_its_guards() {
    // y[oh] = Σ_k x[oh + k - 1] over a 1-D input of 5 with padding 1.
    let build = |guarded: bool| {
        let mut kb = KernelBuilder::new("conv1d");
        let x = kb.input("x", &[B, f(5)]);
        let y = kb.output("y", &[B, f(5)]);
        let [n, oh, k] = [kb.var("n"), kb.var("oh"), kb.var("k")];
        let a = kb.acc("a");
        let ix = v(oh).plus(k, 1).offset(-1);
        let add = add_to(a, ld(x, vec![v(n), ix.clone()]));
        let inner = if guarded { when(in_range(ix, 0, 5), vec![add]) } else { add };
        kb.finish(
            n,
            Extent::Batch,
            vec![lp(oh, 5, vec![set(a, c(0.0)), lp(k, 3, vec![inner]), store(y, vec![v(n), v(oh)], acc(a))])],
        )
    };
    rejects(&build(false), &["in `a = (a + x[n, oh+k-1])`: index 1 of `x` (`oh+k-1`) ranges over [-1, 5]"]);
    accepts(&build(true));
}

#[test]
fn guards_on_the_dims_of_a_flattened_index_bound_it() {
    // A padded 3x3 window over a 4x4 image read through its flattening to 16 elements:
    // `x[4·(h+kh-1) + (w+kw-1)]` under `0 <= h+kh-1 < 4` and `0 <= w+kw-1 < 4`, the guards
    // each of the image's dims had before it was flattened (a conv's input gradient fused
    // with a kernel that views it flat). `row` is the row guard's index (of `h`, `kh`).
    type Row = Option<(fn(VarId, VarId) -> Affine, i64, i64)>;
    let build = |row: Row, col: Option<(i64, i64)>, len: u32| {
        let mut kb = KernelBuilder::new("window");
        let x = kb.input("x", &[f(len)]);
        let y = kb.output("y", &[f(4), f(4)]);
        let [g, h, w, kh, kw] = [kb.var("g"), kb.var("h"), kb.var("w"), kb.var("kh"), kb.var("kw")];
        let a = kb.acc("a");
        let ix = Affine::default().plus(h, 4).plus(kh, 4).plus(w, 1).plus(kw, 1).offset(-5);
        let mut add = add_to(a, ld(x, vec![ix]));
        if let Some((lo, hi)) = col {
            add = when(in_range(v(w).plus(kw, 1).offset(-1), lo, hi), vec![add]);
        }
        if let Some((r, lo, hi)) = row {
            add = when(in_range(r(h, kh), lo, hi), vec![add]);
        }
        let window = lp(kh, 3, vec![lp(kw, 3, vec![add])]);
        let body = vec![set(a, c(0.0)), window, store(y, vec![v(h), v(w)], acc(a))];
        kb.finish(g, Extent::Fixed(1), vec![lp(h, 4, vec![lp(w, 4, body)])])
    };
    let row: fn(VarId, VarId) -> Affine = |h, kh| v(h).plus(kh, 1).offset(-1);
    accepts(&build(Some((row, 0, 4)), Some((0, 4)), 16));
    // Either guard alone leaves an end of the flattened range uncovered.
    rejects(&build(None, None, 16), &["ranges over [-5, 20]"]);
    rejects(&build(Some((row, 0, 4)), None, 16), &["ranges over [-1, 16] even under the enclosing guards"]);
    rejects(&build(None, Some((0, 4)), 16), &["ranges over [-4, 19] even under the enclosing guards"]);
    // A guard one row too wide lets the last row's window past the end.
    rejects(&build(Some((row, 0, 5)), Some((0, 4)), 16), &["ranges over [0, 19] even under the enclosing guards"]);
    accepts(&build(Some((row, 0, 5)), Some((0, 4)), 20));
    // A guard on the negated row (`-3 <= 1-h-kh < 1`) decomposes with a factor of -4.
    let negated: fn(VarId, VarId) -> Affine = |h, kh| Affine::constant(1).plus(h, -1).plus(kh, -1);
    accepts(&build(Some((negated, -3, 1)), Some((0, 4)), 16));
    rejects(&build(Some((negated, -3, 1)), Some((0, 4)), 15), &["ranges over [0, 15] even under the enclosing guards"]);
    // A guard that is never true makes the access unreachable.
    accepts(&build(Some((row, 2, 2)), None, 1));
}

#[test]
fn batch_dims_take_exactly_one_batch_loop_variable() {
    // The grid variable of a fixed-extent grid in a batch dim.
    let mut k = base();
    k.grid.extent = Extent::Fixed(4);
    let want = "index 0 of `x` (`n`) is in a batch dim; it must be exactly one variable of a batch-extent loop";
    rejects(&k, &[want]);
    // `n+1` in a batch dim.
    let mut k = base();
    k.grid.body[2] = store(ArgId(1), vec![v(VarId(0)).offset(1)], acc(AccId(0)));
    rejects(&k, &["index 0 of `y` (`n+1`) is in a batch dim"]);
    // A batch-extent variable in a fixed dim.
    let mut k = base();
    loop_body(&mut k)[0] = add_to(AccId(0), ld(ArgId(0), vec![v(VarId(0)), v(VarId(0))]));
    rejects(&k, &["index 1 of `x` (`n`) uses the batch-extent variable `n` outside a batch dim"]);
    // An inner batch-extent loop indexing the batch dim is fine.
    let mut kb = KernelBuilder::new("batch_sum");
    let x = kb.input("x", &[B, f(3)]);
    let s = kb.output("s", &[f(3)]);
    let [j, n] = [kb.var("j"), kb.var("n")];
    let a = kb.acc("a");
    let body =
        vec![set(a, c(0.0)), batch_lp(n, vec![add_to(a, ld(x, vec![v(n), v(j)]))]), store(s, vec![v(j)], acc(a))];
    accepts(&kb.finish(j, Extent::Fixed(3), body));
}

#[test]
fn zero_extent_loops_are_never_reached() {
    accepts(&gather(0, 4, |i| v(i).offset(100), None));
}

#[test]
fn indices_beyond_64_bit_arithmetic_are_rejected() {
    let k = gather(
        4,
        4,
        |i| v(i).plus(i, i64::MAX).plus(i, i64::MAX).plus(i, 2).plus(i, -i64::MAX).plus(i, -i64::MAX).plus(i, -2),
        None,
    );
    // Like terms are merged in exact arithmetic first: the huge ones cancel, leaving `i`.
    accepts(&k);
    let k = gather(4, 4, |i| v(i).plus(i, i64::MAX).plus(i, i64::MAX), None);
    rejects(&k, &["beyond 64-bit arithmetic"]);
}

#[test]
fn messages_name_the_kernel_and_the_statement() {
    let mut k = base();
    k.name = "bad".into();
    loop_body(&mut k)[0] = add_to(AccId(0), ld(ArgId(0), vec![v(VarId(0)), v(VarId(1)).offset(1)]));
    k.vars.push("spare".into());
    let err = verify(&k).unwrap_err();
    let want = [
        "kernel `bad` is invalid:",
        "  in `s = (s + x[n, i+1])`: index 1 of `x` (`i+1`) ranges over [1, 4], outside the dim 0..4",
        "  variable `spare` is never bound by a loop",
    ];
    assert_eq!(err.to_string(), want.join("\n"));
}

#[test]
fn grid_independence_needs_the_grid_variable_in_one_position() {
    // Per-example kernels: every stored buffer is indexed by the grid variable first.
    assert!(grid_independent(&base()));
    // Reading a stored buffer at another example breaks it.
    let mut k = base();
    k.args[1].mode = Mode::InOut;
    k.grid.body.push(store(ArgId(1), vec![v(VarId(0))], ld(ArgId(1), vec![Affine::constant(0)])));
    assert!(!grid_independent(&k));
    // Stores without the grid variable break it; reads of inputs do not matter.
    let k = gather(4, 4, v, None);
    assert!(!grid_independent(&k));
}
