//! Stage 1, `parse`: `.pdg` text to [`ast::Model`], plus diagnostics.
//!
//! The lexer is logos ([`lexer`]), the grammar lalrpop (`grammar/pdg.lalrpop`, generated
//! into OUT_DIR by build.rs). Parsing never fails outright: it returns whatever AST it could
//! build (statements that did not parse become `Item::Error`) and every diagnostic.

pub mod ast;
pub mod lexer;

use lalrpop_util::{lalrpop_mod, ErrorRecovery, ParseError};

use crate::diag::{Diagnostic, Span};
use lexer::Tok;

lalrpop_mod!(
    #[allow(clippy::all, unused)]
    grammar,
    "/pdg.rs"
);

/// Parses a whole file. The model is `None` only when not even its header could be read.
pub fn parse(src: &str) -> (Option<ast::Model>, Vec<Diagnostic>) {
    let (tokens, mut diags) = lexer::lex(src);
    let ends: Vec<usize> = tokens.iter().map(|(_, _, end)| *end).collect();
    let mut recovered = Vec::new();
    let result = grammar::ModelParser::new().parse(&mut recovered, tokens);
    for ErrorRecovery { error, .. } in recovered {
        diags.push(syntax_error(src, &ends, error));
    }
    match result {
        Ok(model) => (Some(model), diags),
        Err(e) => {
            diags.push(syntax_error(src, &ends, e));
            (None, diags)
        }
    }
}

fn expected_list(expected: &[String]) -> String {
    // lalrpop spells terminals as they appear in the grammar: `"("`, `IDENT`, ...
    let pretty: Vec<String> = expected
        .iter()
        .map(|e| match e.as_str() {
            "IDENT" => "a name".to_string(),
            "INT" => "an integer".to_string(),
            "FLOAT" => "a number".to_string(),
            other => format!("`{}`", other.trim_matches('"')),
        })
        .collect();
    match pretty.len() {
        0 => String::new(),
        1 => pretty[0].clone(),
        n if n <= 6 => format!("{} or {}", pretty[..n - 1].join(", "), pretty[n - 1]),
        _ => format!("{}, ... ({} possibilities)", pretty[..5].join(", "), pretty.len()),
    }
}

/// `ends` holds every token's end offset, in order, to find the token before an error.
fn syntax_error(src: &str, ends: &[usize], e: ParseError<usize, Tok<'_>, ()>) -> Diagnostic {
    match e {
        ParseError::InvalidToken { location } => {
            Diagnostic::error("E0003", "invalid token", Span::new(location, location + 1))
        }
        ParseError::UnrecognizedEof { location, expected } => {
            let at = Span::new(location, location);
            Diagnostic::error("E0004", "unexpected end of file", at)
                .with_label(format!("expected {}", expected_list(&expected)))
                .with_note("every statement ends with `;` and the model with `}`")
        }
        ParseError::UnrecognizedToken { token: (l, tok, r), expected } => {
            let prev_end = ends.iter().rev().find(|&&e| e <= l).copied();
            match prev_end {
                // A missing `;`: point at the end of the statement, where it belongs.
                Some(end) if expected.iter().any(|e| e == "\";\"") && src[end..l].contains('\n') => {
                    Diagnostic::error("E0007", "missing `;` at the end of this statement", Span::new(end - 1, end))
                        .with_label("expected `;` after this")
                        .with_secondary(Span::new(l, r), format!("the next statement starts with {tok}"))
                }
                _ => Diagnostic::error("E0005", format!("unexpected {tok}"), Span::new(l, r))
                    .with_label(format!("expected {}", expected_list(&expected))),
            }
        }
        ParseError::ExtraToken { token: (l, tok, r) } => {
            Diagnostic::error("E0006", format!("unexpected {tok} after the model"), Span::new(l, r))
                .with_label("a file holds exactly one `model { ... }`")
        }
        ParseError::User { error: () } => Diagnostic::error("E0003", "invalid token", Span::new(src.len(), src.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(src: &str) -> String {
        let (model, diags) = parse(&format!("model m {{ layer f(x: [I]) {{ {src} }} }}"));
        assert!(diags.is_empty(), "{diags:?}");
        let Some(ast::Item::Layer(def)) = model.expect("parses").items.into_iter().next() else { panic!("a layer") };
        let Some(ast::BodyItem::Stmt(s)) = def.body.into_iter().next() else { panic!("a statement") };
        s.rhs.to_string()
    }

    #[test]
    fn layer_bodies_parse_with_the_usual_precedence() {
        assert_eq!(body("y[i] = a[i] + b[i] * c[i];"), "(a[i] + (b[i] * c[i]))");
        assert_eq!(body("y[i] = a[i] - b[i] - c[i];"), "((a[i] - b[i]) - c[i])");
        assert_eq!(body("y[i] = -a[i] * 2 / b[i];"), "(((-a[i]) * 2) / b[i])");
        assert_eq!(
            body("y[i] = sum(j, k: w[i, j] * x[2*j + k - 1]) + b[i];"),
            "(sum(j, k: (w[i, j] * x[(((2 * j) + k) - 1)])) + b[i])"
        );
        assert_eq!(body("y[i] = sigmoid((a[i] + 1.5));"), "sigmoid((a[i] + 1.5))");
    }

    #[test]
    fn layer_signatures_and_padding_print_back() {
        let src =
            "model m { layer f(x: [C, 3] pad (1, (0, 2)), K) { param w: [K, C]; y[k] = sum(c: w[k, c] * x[c, 0]); } }";
        let (model, diags) = parse(src);
        assert!(diags.is_empty(), "{diags:?}");
        let text = model.expect("parses").to_string();
        assert!(text.contains("layer f(x: [C, 3] pad (1, (0, 2)), K) {"), "{text}");
        assert!(text.contains("param w: [K, C];"), "{text}");
    }

    #[test]
    fn a_bad_statement_in_a_layer_body_is_skipped_and_reported() {
        let (model, diags) = parse("model m { layer f(x: [I]) { y[i] = * x[i]; z[i] = x[i]; } input x: [3]; }");
        assert_eq!(diags.iter().map(|d| d.code).collect::<Vec<_>>(), vec!["E0005"]);
        let model = model.expect("the rest parses");
        assert_eq!(model.items.len(), 2);
        let ast::Item::Layer(def) = &model.items[0] else { panic!("a layer") };
        assert!(matches!(def.body[0], ast::BodyItem::Error { .. }));
        assert!(matches!(def.body[1], ast::BodyItem::Stmt(_)));
    }
}
