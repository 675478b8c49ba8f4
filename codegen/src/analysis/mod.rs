//! The analyses backends share to decide how a kernel runs, each a pure function of the
//! kernel IR: how its iterations may be split over threads and GPU blocks ([`launch`]),
//! which loops run on vector lanes on the CPU ([`vector`]), and what it costs to run
//! ([`work`], read by the planner's cost model).

pub mod launch;
pub(crate) mod vector;
pub mod work;

use crate::ir::{Affine, ArgId, Loop, Stmt};
use crate::visit::{walk_body, Visitor};

/// Calls `f(arg, index, is_store)` for every load and store in program order.
pub(crate) fn visit_accesses(body: &[Stmt], f: &mut impl FnMut(ArgId, &[Affine], bool)) {
    visit_accesses_in_loops(body, &mut Vec::new(), &mut |arg, index, store, _| f(arg, index, store));
}

/// [`visit_accesses`], also passing the loops of `body` that enclose each access,
/// outermost first (`loops` starts as the enclosing loops outside `body`).
pub(crate) fn visit_accesses_in_loops<'a>(
    body: &'a [Stmt],
    loops: &mut Vec<&'a Loop>,
    f: &mut impl FnMut(ArgId, &'a [Affine], bool, &[&'a Loop]),
) {
    struct Accesses<'l, 'a, F> {
        loops: &'l mut Vec<&'a Loop>,
        f: &'l mut F,
    }
    impl<'a, F: FnMut(ArgId, &'a [Affine], bool, &[&'a Loop])> Visitor<'a> for Accesses<'_, 'a, F> {
        fn access(&mut self, arg: ArgId, index: &'a [Affine], store: bool) {
            (self.f)(arg, index, store, self.loops);
        }
        fn enter_loop(&mut self, l: &'a Loop) {
            self.loops.push(l);
        }
        fn exit_loop(&mut self, _: &'a Loop) {
            self.loops.pop();
        }
    }
    walk_body(&mut Accesses { loops, f }, body);
}
