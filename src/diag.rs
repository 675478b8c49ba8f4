//! Diagnostics: what the front end tells a user about their source.
//!
//! A [`Diagnostic`] is plain data (severity, a stable code, a message, labelled byte spans,
//! notes). Every stage returns its diagnostics instead of stopping at the first one;
//! [`render`] turns them into the familiar `file:line:col` + source line + caret text
//! (codespan-reporting). The codes are stable and listed in README.md.

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term;
use serde::Serialize;

/// A byte range in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }

    /// The smallest span covering both.
    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Label {
    pub span: Span,
    pub message: String,
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>, span: Span) -> Diagnostic {
        Diagnostic::new(Severity::Error, code, message, span)
    }

    pub fn warning(code: &'static str, message: impl Into<String>, span: Span) -> Diagnostic {
        Diagnostic::new(Severity::Warning, code, message, span)
    }

    fn new(severity: Severity, code: &'static str, message: impl Into<String>, span: Span) -> Self {
        Diagnostic {
            severity,
            code,
            message: message.into(),
            labels: vec![Label { span, message: String::new(), primary: true }],
            notes: Vec::new(),
        }
    }

    /// Sets the text under the primary caret.
    pub fn with_label(mut self, message: impl Into<String>) -> Self {
        self.labels[0].message = message.into();
        self
    }

    /// Adds a secondary span (e.g. "first defined here").
    pub fn with_secondary(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label { span, message: message.into(), primary: false });
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The primary span.
    pub fn span(&self) -> Span {
        self.labels[0].span
    }
}

/// True if any diagnostic is an error.
pub fn has_errors(diags: &[Diagnostic]) -> bool {
    diags.iter().any(Diagnostic::is_error)
}

/// Renders diagnostics as plain text: `error[E..]: msg`, `┌─ file:line:col`, the source
/// line and carets. Deterministic (no colour), so it is what snapshots hold.
pub fn render(file_name: &str, src: &str, diags: &[Diagnostic]) -> String {
    let file = SimpleFile::new(file_name, src);
    let config = term::Config::default();
    let mut out = String::new();
    for d in diags {
        // A span past the end of the file (an "unexpected end of input", say) is clamped
        // so rendering can never fail.
        let clamp = |s: Span| s.start.min(src.len())..s.end.min(src.len()).max(s.start.min(src.len()));
        let labels = d
            .labels
            .iter()
            .map(|l| {
                let lab = if l.primary {
                    cs::Label::primary((), clamp(l.span))
                } else {
                    cs::Label::secondary((), clamp(l.span))
                };
                lab.with_message(&l.message)
            })
            .collect();
        let sev = match d.severity {
            Severity::Error => cs::Severity::Error,
            Severity::Warning => cs::Severity::Warning,
        };
        let diagnostic = cs::Diagnostic::new(sev)
            .with_code(d.code)
            .with_message(&d.message)
            .with_labels(labels)
            .with_notes(d.notes.clone());
        match term::emit_into_string(&config, &file, &diagnostic) {
            Ok(s) => out.push_str(&s),
            // Unreachable with clamped spans; keep the message rather than lose it.
            Err(e) => out.push_str(&format!("{file_name}: {}: {} ({e})\n", d.code, d.message)),
        }
    }
    out
}

/// Edit distance, for "did you mean" suggestions.
fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_nearest_plausible_word() {
        assert_eq!(did_you_mean("con2d", ["conv1d", "conv2d", "linear"]), Some("conv2d"));
        assert_eq!(did_you_mean("strid", ["stride", "padding"]), Some("stride"));
        assert_eq!(did_you_mean("banana", ["stride", "padding"]), None);
    }

    #[test]
    fn rendering_points_at_line_and_column() {
        let src = "model m {\n  h = foo(x);\n}\n";
        let d = Diagnostic::error("E0100", "unknown layer `foo`", Span::new(16, 19)).with_label("here");
        let text = render("m.pdg", src, &[d]);
        assert!(text.contains("m.pdg:2:7"), "{text}");
        assert!(text.contains("^^^"), "{text}");
    }
}
