//! The `.pdg` lexer (logos). Produces `(start, Tok, end)` triples for the lalrpop parser.
//!
//! Bad characters and out-of-range integers do not stop lexing: each becomes a diagnostic
//! and is left out of the token stream, so the parser still sees (and reports on) the rest.

use logos::Logos;

use crate::diag::{Diagnostic, Span};

/// One token. Identifiers and numbers borrow from the source.
#[derive(Logos, Debug, Clone, PartialEq)]
#[logos(skip r"[ \t\r\n\f]+")]
#[logos(skip(r"//[^\n]*", allow_greedy = true))]
#[logos(skip(r"#[^\n]*", allow_greedy = true))]
pub enum Tok<'s> {
    #[token("model")]
    Model,
    #[token("input")]
    Input,
    #[token("label")]
    Label,
    #[token("loss")]
    Loss,
    #[token("true")]
    True,
    #[token("false")]
    False,
    #[token("layer")]
    Layer,
    #[token("param")]
    Param,
    #[token("sum")]
    Sum,
    #[token("pad")]
    Pad,
    #[regex("[A-Za-z_][A-Za-z0-9_]*", |lex| lex.slice())]
    Ident(&'s str),
    #[regex("[0-9]+", |lex| lex.slice().parse::<i64>().ok())]
    Int(i64),
    #[regex(r"[0-9]+\.[0-9]*([eE][+-]?[0-9]+)?", |lex| lex.slice().parse::<f64>().ok())]
    #[regex(r"[0-9]+[eE][+-]?[0-9]+", |lex| lex.slice().parse::<f64>().ok())]
    Float(f64),
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token(",")]
    Comma,
    #[token(";")]
    Semi,
    #[token(":")]
    Colon,
    #[token("=")]
    Eq,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("@")]
    At,
}

impl std::fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Int(i) => write!(f, "`{i}`"),
            Tok::Float(x) => write!(f, "`{x}`"),
            other => f.write_str(token_text(other)),
        }
    }
}

fn token_text(t: &Tok<'_>) -> &'static str {
    match t {
        Tok::Model => "`model`",
        Tok::Input => "`input`",
        Tok::Label => "`label`",
        Tok::Loss => "`loss`",
        Tok::True => "`true`",
        Tok::False => "`false`",
        Tok::Layer => "`layer`",
        Tok::Param => "`param`",
        Tok::Sum => "`sum`",
        Tok::Pad => "`pad`",
        Tok::LBrace => "`{`",
        Tok::RBrace => "`}`",
        Tok::LParen => "`(`",
        Tok::RParen => "`)`",
        Tok::LBracket => "`[`",
        Tok::RBracket => "`]`",
        Tok::Comma => "`,`",
        Tok::Semi => "`;`",
        Tok::Colon => "`:`",
        Tok::Eq => "`=`",
        Tok::Plus => "`+`",
        Tok::Minus => "`-`",
        Tok::Star => "`*`",
        Tok::Slash => "`/`",
        Tok::At => "`@`",
        Tok::Ident(_) | Tok::Int(_) | Tok::Float(_) => "a literal",
    }
}

/// Lexes the whole source. Returns the tokens the parser consumes and the lexical
/// diagnostics (unknown characters, numbers out of range).
pub fn lex(src: &str) -> (Vec<(usize, Tok<'_>, usize)>, Vec<Diagnostic>) {
    let mut tokens = Vec::new();
    let mut diags = Vec::new();
    let mut lexer = Tok::lexer(src);
    while let Some(result) = lexer.next() {
        let range = lexer.span();
        match result {
            Ok(tok) => tokens.push((range.start, tok, range.end)),
            Err(()) => {
                let span = Span::new(range.start, range.end);
                let text = lexer.slice();
                let d = if text.chars().next().is_some_and(|c| c.is_ascii_digit()) {
                    Diagnostic::error("E0002", format!("number `{text}` is out of range"), span)
                        .with_label("integers must fit in 64 bits")
                } else {
                    Diagnostic::error("E0001", format!("unexpected character `{text}`"), span)
                        .with_label("not part of the .pdg language")
                        .with_note("names use letters, digits and `_`; comments start with `//` or `#`")
                };
                diags.push(d);
            }
        }
    }
    (tokens, diags)
}
