//! Exported functions' signatures, as `status --json` lists them under
//! `signatures` and the prompt shows them (`square(x: u64) -> u64`).

use serde_json::json;

/// One exported function's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The function, as a call names it (`PLUGIN::FN` when several plugins
    /// export the name).
    pub function: String,
    /// The plugin's text (`square(x: u64) -> u64`); `None` when the plugin
    /// describes none (a C plugin, the explicit `plugin!` form).
    pub text: Option<String>,
    /// The arguments' names and types, parsed from the text.
    pub args: Option<Vec<(String, String)>>,
    /// The result's type (`()` when the function returns nothing).
    pub returns: Option<String>,
}

impl Signature {
    /// The signature of `function` from the plugin's `text`.
    pub fn new(function: String, text: Option<String>) -> Signature {
        let parsed = text.as_deref().and_then(parse);
        let (args, returns) = match parsed {
            Some((args, returns)) => (Some(args), Some(returns)),
            None => (None, None),
        };
        Signature {
            function,
            text,
            args,
            returns,
        }
    }

    /// What the prompt shows: the text with the name a call uses, or the
    /// bare name.
    pub fn display(&self) -> String {
        match (&self.args, &self.returns) {
            (Some(args), Some(returns)) => {
                let args: Vec<String> = args.iter().map(|(n, t)| format!("{n}: {t}")).collect();
                format!("{}({}) -> {returns}", self.function, args.join(", "))
            }
            _ => self.function.clone(),
        }
    }

    /// As a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "function": self.function,
            "signature": self.text,
            "args": self.args.as_ref().map(|args| args
                .iter()
                .map(|(name, ty)| json!({"name": name, "type": ty}))
                .collect::<Vec<_>>()),
            "returns": self.returns,
        })
    }

    /// From that JSON object (the parts are parsed again from the text).
    pub fn from_json(value: &serde_json::Value) -> Result<Signature, String> {
        let o = crate::json::Object::new(
            value,
            "a signature",
            &["function", "signature", "args", "returns"],
        )?;
        Ok(Signature::new(o.str("function")?, o.opt_str("signature")?))
    }
}

/// `name(a: T, b: U) -> R` as its arguments and result type; `None` when
/// the text is not of that form. Commas inside `<>`, `()` and `[]` belong to
/// the type.
pub fn parse(text: &str) -> Option<(Vec<(String, String)>, String)> {
    let open = text.find('(')?;
    let mut depth = 0usize;
    let mut close = None;
    for (i, c) in text.char_indices().skip_while(|&(i, _)| i < open) {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' if depth > 0 => {
                depth -= 1;
                if depth == 0 && c == ')' {
                    close = Some(i);
                    break;
                }
            }
            _ => {}
        }
    }
    let close = close?;
    let inner = &text[open + 1..close];
    let rest = text[close + 1..].trim();
    let returns = match rest.strip_prefix("->") {
        Some(r) if !r.trim().is_empty() => r.trim().to_owned(),
        Some(_) => return None,
        None if rest.is_empty() => "()".to_owned(),
        None => return None,
    };
    let mut args = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    let mut pieces = Vec::new();
    for (i, c) in inner.char_indices() {
        match c {
            '(' | '<' | '[' => depth += 1,
            ')' | '>' | ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                pieces.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&inner[start..]);
    for piece in pieces {
        let piece = piece.trim();
        if piece.is_empty() {
            continue;
        }
        let (name, ty) = piece.split_once(':')?;
        let (name, ty) = (name.trim(), ty.trim());
        if name.is_empty() || ty.is_empty() {
            return None;
        }
        args.push((name.to_owned(), ty.to_owned()));
    }
    Some((args, returns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_parse_into_arguments_and_a_result() {
        let (args, returns) = parse("square(x: u64) -> u64").unwrap();
        assert_eq!(args, [("x".to_owned(), "u64".to_owned())]);
        assert_eq!(returns, "u64");
        let (args, returns) =
            parse("f(m: HashMap<String, Vec<(u8, u8)>>, s: &str) -> Option<[u8; 4]>").unwrap();
        assert_eq!(
            args,
            [
                ("m".to_owned(), "HashMap<String, Vec<(u8, u8)>>".to_owned()),
                ("s".to_owned(), "&str".to_owned())
            ]
        );
        assert_eq!(returns, "Option<[u8; 4]>");
        assert_eq!(parse("version()").unwrap(), (vec![], "()".to_owned()));
        for bad in [
            "",
            "f",
            "f(x) -> u8",
            "f(x: u8) garbage",
            "f(x: u8) ->",
            "f(: u8)",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_signature_round_trips_through_json_and_displays_its_call_name() {
        let s = Signature::new(
            "example::square".into(),
            Some("square(x: u64) -> u64".into()),
        );
        assert_eq!(s.display(), "example::square(x: u64) -> u64");
        assert_eq!(Signature::from_json(&s.to_json()).unwrap(), s);
        let none = Signature::new("c_fn".into(), None);
        assert_eq!(none.display(), "c_fn");
        assert_eq!(none.to_json()["args"], serde_json::Value::Null);
    }
}
