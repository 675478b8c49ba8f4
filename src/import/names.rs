//! The reversible mapping between PyTorch module paths (`features.0`, `layer1.0.conv1`) and
//! `.pdg` layer names (`features_0`, `layer1_0_conv1`).
//!
//! [`encode`]: every `_` becomes `__`, every `.` becomes `_`; a name that would start with a
//! digit or be a `.pdg` keyword gets one more leading `_`. [`decode`] undoes it: a leading run
//! of an odd number of underscores loses one, then each `__` is a `_` and each single `_` a
//! `.`. The pair is exact for every path whose segments are non-empty, made of ASCII letters,
//! digits and `_`, and have no `_` next to a `.` (so `a._b` and `a_.b`, which would both become
//! `a___b`, are refused); PyTorch's own module names (`features.0`, `downsample.0`,
//! `_orig_mod.conv1`) all qualify.

/// Words the `.pdg` lexer reserves; a layer cannot be named after one of them.
const KEYWORDS: &[&str] = &["model", "input", "label", "loss", "true", "false", "layer", "param", "sum", "pad"];

/// The `.pdg` name of a PyTorch module path, or why the path cannot be mapped.
pub fn encode(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("the name is empty".into());
    }
    if let Some(c) = path.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '.')) {
        return Err(format!("`{c}` is not a letter, digit, `_` or `.`"));
    }
    if path.split('.').any(str::is_empty) {
        return Err("it has an empty segment (`..`, or a leading or trailing `.`)".into());
    }
    if path.contains("._") || path.contains("_.") {
        return Err("a `_` next to a `.` would make the name ambiguous".into());
    }
    let mut out = path.replace('_', "__").replace('.', "_");
    if out.starts_with(|c: char| c.is_ascii_digit()) || KEYWORDS.contains(&out.as_str()) {
        out.insert(0, '_');
    }
    Ok(out)
}

/// The PyTorch module path of a `.pdg` layer name (the inverse of [`encode`]).
pub fn decode(name: &str) -> String {
    let leading = name.len() - name.trim_start_matches('_').len();
    let rest = if leading % 2 == 1 { &name[1..] } else { name };
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '_' {
            out.push(c);
        } else if chars.peek() == Some(&'_') {
            chars.next();
            out.push('_');
        } else {
            out.push('.');
        }
    }
    out
}

/// A parameter's name in a PyTorch `state_dict` (`features.0.weight`) given its `.pdg` name
/// (`features_0.weight`).
pub fn pytorch_param_name(pdg_name: &str) -> String {
    match pdg_name.rsplit_once('.') {
        Some((layer, suffix)) => format!("{}.{suffix}", decode(layer)),
        None => decode(pdg_name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_paths_round_trip() {
        for (path, name) in [
            ("features.0", "features_0"),
            ("layer1.0.conv1", "layer1_0_conv1"),
            ("layer2.0.down.conv", "layer2_0_down_conv"),
            ("conv_1", "conv__1"),
            ("block_a.conv_b.0", "block__a_conv__b_0"),
            ("_orig_mod.fc", "__orig__mod_fc"),
            ("0", "_0"),
            ("0.weight_norm", "_0_weight__norm"),
            ("input", "_input"),
            ("pad", "_pad"),
            ("sum", "_sum"),
            ("x__y", "x____y"),
            ("fc_", "fc__"),
        ] {
            assert_eq!(encode(path).as_deref(), Ok(name), "{path}");
            assert_eq!(decode(name), path, "{name}");
        }
    }

    #[test]
    fn keywords_are_words_the_lexer_reserves() {
        for word in KEYWORDS {
            let (tokens, _) = crate::syntax::lexer::lex(word);
            assert!(!matches!(tokens[0].1, crate::syntax::lexer::Tok::Ident(_)), "{word} is not reserved");
        }
    }

    #[test]
    fn ambiguous_or_invalid_paths_are_refused() {
        for path in ["a._b", "a_.b", "a..b", ".a", "a.", "", "a-b", "a/b", "onnx::Conv_3"] {
            assert!(encode(path).is_err(), "{path}");
        }
    }

    #[test]
    fn parameter_names_map_back() {
        assert_eq!(pytorch_param_name("features_0.weight"), "features.0.weight");
        assert_eq!(pytorch_param_name("conv__1.bias"), "conv_1.bias");
        assert_eq!(pytorch_param_name("_0.weight"), "0.weight");
    }
}
