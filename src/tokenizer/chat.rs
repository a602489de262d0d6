//! Chat templates rendered as Hugging Face's `apply_chat_template` does.
//!
//! transformers renders with jinja2's `ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True, extensions=[loopcontrols])`, adds the globals `raise_exception` and
//! `strftime_now`, replaces `tojson` with its own (no HTML escaping, `ensure_ascii=False`,
//! Python's separators), and passes the tokenizer's special tokens as variables. minijinja with
//! the same settings plus `minijinja_contrib`'s Python string methods renders the templates
//! models ship byte for byte the same way.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

use super::ChatMessage;
use crate::error::{Error, Result};

/// The name the template is registered under; minijinja reports errors against it.
const TEMPLATE_NAME: &str = "chat_template";

/// The special-token strings a template may refer to (`bos_token`, `eos_token`, ...).
///
/// Each is `None` when tokenizer_config.json does not name it; the template then sees it
/// undefined, as it would in transformers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos_token: Option<String>,
    /// `eos_token`.
    pub eos_token: Option<String>,
    /// `unk_token`.
    pub unk_token: Option<String>,
    /// `pad_token`.
    pub pad_token: Option<String>,
}

/// A parsed chat template, ready to render conversations.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Parses `source`; a syntax error becomes [`Error::ChatTemplate`] naming the line.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let mut env = Environment::new();
        // jinja2's settings in transformers; keep_trailing_newline stays false as there.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        // jinja2's default `Undefined`: printing or testing an unknown name is fine (Llama 3.1's
        // template checks `date_string is defined`), using its attributes is an error.
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.into()).map_err(template_error)?;
        Ok(ChatTemplate { env })
    }

    /// Renders `messages` like `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special: &SpecialTokens,
    ) -> Result<String> {
        self.render_with_tools(messages, add_generation_prompt, special, None)
    }

    /// [`render`](Self::render) with `tools` (OpenAI's list of `{"type": "function",
    /// "function": {...}}`), as `apply_chat_template(messages, tools=tools, ...)`.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        special: &SpecialTokens,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_error)?;
        let mut ctx: Vec<(&str, Value)> = vec![
            ("messages", Value::from_serialize(messages)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            // transformers passes `tools=None` when the caller gives no tools.
            ("tools", tools.map_or(Value::from(()), Value::from_serialize)),
        ];
        let named = [
            ("bos_token", &special.bos_token),
            ("eos_token", &special.eos_token),
            ("unk_token", &special.unk_token),
            ("pad_token", &special.pad_token),
        ];
        for (name, value) in named {
            if let Some(v) = value {
                ctx.push((name, Value::from(v.as_str())));
            }
        }
        let ctx: Value = ctx.into_iter().collect();
        template.render(ctx).map_err(template_error)
    }
}

impl ChatTemplate {
    /// Whether the template renders tools: a conversation rendered with one probe tool shows
    /// the tool's name (Llama 3.1's does; Tülu 3's and SmolLM2's have no tool section).
    pub fn renders_tools(&self, special: &SpecialTokens) -> bool {
        const PROBE: &str = "tulu_probe_function_7f3a";
        let tools = serde_json::json!([{"type": "function", "function": {
            "name": PROBE, "description": "probe", "parameters": {"type": "object", "properties": {}}
        }}]);
        let messages = [ChatMessage::new("user", "hi")];
        self.render_with_tools(&messages, true, special, Some(&tools)).is_ok_and(|text| text.contains(PROBE))
    }
}

/// Picks the template out of tokenizer_config.json's `chat_template`, which is either the
/// template text or a list of `{name, template}` of which transformers uses `default`.
/// `Ok(None)` when there is no usable template; `Err` describes a malformed field.
pub fn template_source(field: &serde_json::Value) -> std::result::Result<Option<String>, String> {
    match field {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s.clone())),
        serde_json::Value::Array(items) => {
            let mut names = Vec::new();
            for item in items {
                let name = item.get("name").and_then(|n| n.as_str());
                let template = item.get("template").and_then(|t| t.as_str());
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_owned())),
                    (Some(n), Some(_)) => names.push(n.to_owned()),
                    _ => return Err("`chat_template` list entries need `name` and `template` strings".into()),
                }
            }
            if names.is_empty() {
                Ok(None)
            } else {
                Err(format!("`chat_template` has no `default` entry (it has: {})", names.join(", ")))
            }
        }
        _ => Err("`chat_template` must be a string or a list of {name, template}".into()),
    }
}

/// Turns a minijinja error into [`Error::ChatTemplate`], leading with the template line so a
/// user can find the construct at fault in tokenizer_config.json.
fn template_error(e: minijinja::Error) -> Error {
    let what = match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_owned(),
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.kind().to_string(),
    };
    let message = match e.line() {
        Some(line) => format!("line {line}: {what}"),
        None => what,
    };
    Error::ChatTemplate { message }
}

/// transformers' `raise_exception(message)`: templates call it to reject a conversation (e.g. an
/// unsupported role order), and the message is what the user must see.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `strftime_now(format)`: the local time, as Python's `strftime` formats it.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    use std::fmt::Write;
    let mut out = String::new();
    // chrono reports an unknown specifier as a fmt error instead of panicking, if written so.
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: bad format {format:?}"))
    })?;
    Ok(out)
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. minijinja's own `tojson` escapes `<`, `>`, `&`
/// and `'` for HTML and prints no spaces, so tool definitions would render differently.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an int or a string",
                ))
            }
        },
    };
    // Python's defaults: compact lines get ", ", indented ones "," (the newline separates).
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let dumper = JsonDumper {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    dumper.dump(value, 0, &mut out)?;
    Ok(out)
}

/// Python `json.dumps` over minijinja values.
struct JsonDumper {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl JsonDumper {
    fn dump(&self, value: &Value, depth: usize, out: &mut String) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
            ValueKind::Number => {
                let f = f64::try_from(value.clone())?;
                out.push_str(&python_float_repr(f));
            }
            ValueKind::String => self.string(value.as_str().unwrap_or_default(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    self.item_start(i, depth + 1, out);
                    // Python converts non-string keys (numbers, bools) to their JSON text.
                    match key.as_str() {
                        Some(k) => self.string(k, out),
                        None => {
                            let mut k = String::new();
                            self.dump(key, depth + 1, &mut k)?;
                            self.string(&k, out);
                        }
                    }
                    out.push_str(&self.key_sep);
                    self.dump(&value.get_item(key)?, depth + 1, out)?;
                }
                self.close(depth, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.item_start(i, depth + 1, out);
                    self.dump(item, depth + 1, out)?;
                }
                self.close(depth, out);
                out.push(']');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot serialize a value of type {}", value.kind()),
                ))
            }
        }
        Ok(())
    }

    /// Writes what goes before the `i`-th item of a container at nesting `depth`.
    fn item_start(&self, i: usize, depth: usize, out: &mut String) {
        if i > 0 {
            out.push_str(&self.item_sep);
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    /// Writes what goes before a container's closing bracket.
    fn close(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` as json.dumps writes it: `1.0`, `0.1`, `1e+16`, `1e-05`, `NaN`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Python switches to exponent notation outside [1e-4, 1e16); Rust's shortest round-trip
    // digits are the same as Python's, only the exponent is spelled differently.
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    format!("{f:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_str(source: &str) -> Result<String> {
        ChatTemplate::new(source)?.render(&[], false, &SpecialTokens::default())
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        // Expected strings are what Python's json.dumps(..., ensure_ascii=False) prints.
        let got = render_str(r#"{{ {"a": 1, "b": [1.5, true, none], "c": "<é\n>"} | tojson }}"#);
        assert_eq!(got.ok().as_deref(), Some(r#"{"a": 1, "b": [1.5, true, null], "c": "<é\n>"}"#));
        let got = render_str(r#"{{ {"a": [1, {}], "b": []} | tojson(indent=2) }}"#);
        assert_eq!(got.ok().as_deref(), Some("{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"));
        let got = render_str(r#"{{ {"b": 1, "a": "é"} | tojson(sort_keys=true, ensure_ascii=true) }}"#);
        assert_eq!(got.ok().as_deref(), Some(r#"{"a": "\u00e9", "b": 1}"#));
    }

    #[test]
    fn python_float_repr_spells_exponents_like_python() {
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(python_float_repr(-2.5e300), "-2.5e+300");
    }

    #[test]
    fn jinja2_whitespace_control_and_python_methods() {
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indent before it.
        let got = render_str("{% if true %}\n    {% if true %}\nx\n  {% endif %}\n{% endif %}\n");
        assert_eq!(got.ok().as_deref(), Some("x\n"));
        let got = render_str(
            "{{ '  a b '.strip() }}|{% if 'abc'.startswith('ab') %}y{% endif %}|{{ 'a,b'.split(',') | length }}",
        );
        assert_eq!(got.ok().as_deref(), Some("a b|y|2"));
    }

    #[test]
    fn undefined_names_are_lenient_like_jinja2() {
        let got = render_str(
            "[{{ nothing }}]{% if not date_string is defined %}{% set date_string = 'd' %}{% endif %}{{ date_string }}",
        );
        assert_eq!(got.ok().as_deref(), Some("[]d"));
    }

    #[test]
    fn strftime_now_formats_like_python_and_rejects_bad_formats() {
        let year = render_str("{{ strftime_now('%Y') }}").unwrap_or_default();
        assert!(year.len() == 4 && year.bytes().all(|b| b.is_ascii_digit()), "{year:?}");
        assert!(matches!(render_str("{{ strftime_now('%Q') }}"), Err(Error::ChatTemplate { .. })));
    }

    #[test]
    fn template_source_picks_default_from_a_list() {
        let field = serde_json::json!([{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]);
        assert_eq!(template_source(&field), Ok(Some("d".to_owned())));
        let field = serde_json::json!([{"name": "tool_use", "template": "t"}]);
        assert!(template_source(&field).is_err());
        assert_eq!(template_source(&serde_json::Value::Null), Ok(None));
    }
}
