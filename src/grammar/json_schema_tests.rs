//! JSON-schema keywords llguidance cannot enforce: the grammar still allows every valid answer
//! and refuses what it can, and the check at EOS turns an answer that breaks a relaxed keyword
//! into an error naming that keyword. Answers are fed byte by byte over the test vocabulary
//! (every printable ASCII byte is a token).

use serde_json::json;

use super::vocabulary::env_of_words;
use super::*;

const EOS: u32 = 0;

/// How feeding an answer ended.
#[derive(Debug, PartialEq)]
enum Fed {
    /// The grammar allowed every byte and EOS, and the check passed.
    Valid,
    /// The grammar refused the byte at this offset (or EOS, at the answer's length).
    RefusedAt(usize),
    /// The check after generation refused it with this error.
    Checked(String),
}

fn matcher(schema: serde_json::Value) -> (TokenMatcher, usize) {
    let mut words = vec![b"\xff<eos>".to_vec()];
    words.extend((0x20u8..0x7f).map(|b| vec![b]));
    let width = words.len();
    let f = factory(&env_of_words(words, width, &[EOS], false)).expect("factory");
    (compile(&f, &Constraint::JsonSchema(schema), "test", &[EOS]).expect("compiles"), width)
}

fn feed(schema: &serde_json::Value, answer: &str) -> Fed {
    let (mut m, width) = matcher(schema.clone());
    let mut mask = vec![0u32; TokenMatcher::words(width)];
    let allows = |mask: &[u32], t: u32| mask[t as usize / 32] >> (t % 32) & 1 == 1;
    for (i, b) in answer.bytes().enumerate() {
        let token = u32::from(b - 0x20) + 1;
        if m.fill_mask(&mut mask).is_err() || !allows(&mask, token) {
            return Fed::RefusedAt(i);
        }
        m.commit(token).expect("an allowed token commits");
    }
    if m.fill_mask(&mut mask).is_err() || !allows(&mask, EOS) {
        return Fed::RefusedAt(answer.len());
    }
    match m.commit(EOS) {
        Ok(()) => Fed::Valid,
        Err(e) => Fed::Checked(e),
    }
}

/// Each answer fed under `schema`: valid ones pass, grammar-refused ones are refused, and
/// those the check catches name `keyword` (and the schema path `path`).
fn check(schema: serde_json::Value, valid: &[&str], refused: &[&str], caught: &[&str], keyword: &str, path: &str) {
    for a in valid {
        assert_eq!(feed(&schema, a), Fed::Valid, "{schema} {a}");
    }
    for a in refused {
        assert!(matches!(feed(&schema, a), Fed::RefusedAt(_)), "{schema} {a}: {:?}", feed(&schema, a));
    }
    for a in caught {
        match feed(&schema, a) {
            Fed::Checked(e) => {
                assert!(e.contains(&format!("`{keyword}` (at `{path}`)")), "{schema} {a}: {e}")
            }
            other => panic!("{schema} {a}: {other:?}"),
        }
    }
}

#[test]
fn an_exact_grammar_has_no_check() {
    let (m, _) = matcher(json!({"type": "array", "items": {"type": "integer"}, "maxItems": 2}));
    assert!(m.relaxed().is_empty() && m.check.is_none());
}

#[test]
fn unknown_formats_are_ignored_and_regex_strings_are_checked() {
    let (m, _) = matcher(json!({"type": "string", "format": "color"}));
    assert_eq!(m.relaxed(), ["format \"color\""]);
    check(json!({"type": "string", "format": "color"}), &["\"red\"", "\"#fff\""], &["12", "null"], &[], "", "");
    let regex =
        json!({"type": "object", "properties": {"rx": {"type": "string", "format": "regex"}}, "required": ["rx"]});
    check(regex, &[r#"{"rx":"a+b*"}"#], &[r#"{"rx":1}"#, "{}"], &[r#"{"rx":"a("}"#], "format", "/properties/rx/format");
}

#[test]
fn one_of_is_any_of_in_the_grammar_and_exactly_one_after() {
    let disjoint = json!({"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]});
    check(disjoint, &["7", "\"abc\""], &["true", "\"abcd\"", "1.5"], &[], "", "");
    let overlapping = json!({"oneOf": [{"type": "integer"}, {"type": "number", "minimum": 5}]});
    check(overlapping, &["1", "5.5"], &["\"x\""], &["7"], "oneOf", "/oneOf");
}

#[test]
fn unique_items_is_checked_after() {
    let schema = json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true});
    check(schema, &["[1,2,3]", "[]"], &["[\"a\"]", "{}"], &["[1,2,1]"], "uniqueItems", "/uniqueItems");
}

#[test]
fn not_is_checked_after() {
    let schema = json!({"type": "object", "properties": {"s": {"type": "string", "not": {"const": "no"}}}});
    check(schema, &[r#"{"s":"yes"}"#, "{}"], &[r#"{"s":1}"#], &[r#"{"s":"no"}"#], "not", "/properties/s/not");
}

#[test]
fn dependencies_and_dependent_required_are_checked_after() {
    let props = json!({"a": {"type": "integer"}, "b": {"type": "integer"}});
    let old = json!({"type": "object", "properties": props, "dependencies": {"a": ["b"]}});
    check(
        old,
        &[r#"{"b":1}"#, r#"{"a":1,"b":2}"#],
        &[r#"{"a":"x"}"#],
        &[r#"{"a":1}"#],
        "dependencies",
        "/dependencies",
    );
    let new = json!({"type": "object", "properties": props, "dependentRequired": {"a": ["b"]}});
    let path = "/dependentRequired";
    check(new, &[r#"{"b":1}"#, r#"{"a":1,"b":2}"#], &[r#"{"a":"x"}"#], &[r#"{"a":1}"#], "dependentRequired", path);
}

#[test]
fn if_then_else_is_checked_after() {
    let schema = json!({
        "type": "object",
        "properties": {"kind": {"enum": ["a", "b"]}, "n": {"type": "integer"}},
        "required": ["kind"],
        "if": {"properties": {"kind": {"const": "a"}}},
        "then": {"required": ["n"]},
        "else": {"not": {"required": ["n"]}}
    });
    let valid = [r#"{"kind":"a","n":1}"#, r#"{"kind":"b"}"#];
    check(schema.clone(), &valid, &[r#"{"n":1}"#, r#"{"kind":"c"}"#], &[r#"{"kind":"a"}"#], "then", "/then/required");
    check(schema, &[], &[], &[r#"{"kind":"b","n":2}"#], "else", "/else/not");
}

#[test]
fn a_relaxed_schema_the_validator_cannot_take_is_refused_naming_what_was_relaxed() {
    let w = vec![b"\xff<eos>".to_vec(), b"a".to_vec()];
    let f = factory(&env_of_words(w, 2, &[EOS], false)).expect("factory");
    let schema = json!({"type": "string", "not": {"pattern": "a("}});
    match compile(&f, &Constraint::JsonSchema(schema), "response_format", &[EOS]) {
        Err(Error::Request { param, message }) => {
            assert_eq!(param, "response_format");
            assert!(message.contains("cannot be honoured") && message.contains("`not`"), "{message}");
        }
        other => panic!("{:?}", other.map(|m| m.relaxed().to_vec())),
    }
}
