//! JSON schemas as grammars, with what llguidance cannot enforce checked after generation.
//!
//! llguidance compiles a useful subset of JSON Schema into a grammar and refuses the rest
//! (`uniqueItems`, `not`, `dependencies`, `if`, formats it does not know, `oneOf`, ...). Many
//! real-world schemas use those keywords, so tulu compiles every schema in llguidance's
//! *lenient* mode — each keyword it cannot enforce is left out of the grammar and named in a
//! warning; `oneOf` becomes `anyOf` — and, when anything was left out, checks the finished
//! answer against the whole schema with the `jsonschema` validator. The grammar is then looser
//! than the schema, never stricter, so every answer the schema allows can still be generated,
//! and an answer that breaks a relaxed keyword ends as an error naming that keyword instead of
//! reaching the client. A schema that llguidance relaxes and the validator cannot check either
//! (a remote `$ref`, say) is refused: tulu would have no way to honour it.

use llguidance::api::TopLevelGrammar;
use serde_json::Value;

/// Keywords an error is reported under, when a validator's schema path ends in one of them
/// (deeper segments name properties or indices, not the rule that was broken).
const KEYWORDS: [&str; 40] = [
    "type",
    "enum",
    "const",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "items",
    "additionalItems",
    "prefixItems",
    "contains",
    "minContains",
    "maxContains",
    "minItems",
    "maxItems",
    "uniqueItems",
    "unevaluatedItems",
    "properties",
    "patternProperties",
    "additionalProperties",
    "propertyNames",
    "unevaluatedProperties",
    "required",
    "minProperties",
    "maxProperties",
    "dependencies",
    "dependentRequired",
    "dependentSchemas",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
];

/// Keywords whose segment is followed by a name (a property, a definition), not a keyword.
const NAMED: [&str; 6] =
    ["properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies"];

/// Keywords llguidance leaves to the check after generation: an error under one of them is
/// reported under it, however deep below it the broken rule is (`/then/required` is `then`).
const CHECKED_AFTER: [&str; 10] = [
    "uniqueItems",
    "not",
    "dependencies",
    "dependentRequired",
    "dependentSchemas",
    "if",
    "then",
    "else",
    "oneOf",
    "format",
];

/// The llguidance grammar of `schema`, compiled leniently: what llguidance cannot enforce is
/// left out and reported in the parser's warnings (see [`PostCheck::for_schema`]).
pub fn grammar(schema: &Value) -> TopLevelGrammar {
    let mut schema = schema.clone();
    if let Value::Object(fields) = &mut schema {
        // A client's own `x-guidance` options stay; leniency is added to them.
        let options = fields.entry("x-guidance").or_insert_with(|| Value::Object(Default::default()));
        if let Value::Object(options) = options {
            options.insert("lenient".into(), Value::Bool(true));
        }
    }
    TopLevelGrammar::from_json_schema(schema)
}

/// What llguidance's warnings say it relaxed, one short note each (`uniqueItems`, `format
/// "color"`, `oneOf (as anyOf)`, ...). A warning of another kind is a note as it stands: any
/// warning means the grammar may be looser than the schema, so it must bring the check.
pub fn relaxations(warnings: &[String]) -> Vec<String> {
    let mut notes: Vec<String> = Vec::new();
    for w in warnings {
        let w = first_line(w).trim();
        // llguidance folds repeats into one warning ending in ` (N times)`.
        let w = match w.rsplit_once(" (") {
            Some((head, tail)) if tail.ends_with(" times)") => head,
            _ => w,
        };
        let found: Vec<String> = if let Some(keys) = w.strip_prefix("Unimplemented keys: ") {
            serde_json::from_str::<Vec<String>>(keys).unwrap_or_else(|_| vec![w.to_string()])
        } else if let Some(format) = w.strip_prefix("Unknown format: ") {
            vec![format!("format \"{format}\"")]
        } else if w.starts_with("oneOf not fully supported") {
            vec!["oneOf (as anyOf)".into()]
        } else if w.starts_with("min/maxProperties only supported") {
            vec!["minProperties/maxProperties".into()]
        } else {
            vec![w.to_string()]
        };
        for note in found {
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
    }
    notes
}

/// The whole schema, checked against a finished answer whose grammar was relaxed.
pub struct PostCheck {
    validator: jsonschema::Validator,
}

impl PostCheck {
    /// The check `schema` needs when llguidance left out what `relaxed` names: none when
    /// nothing was. An error when something was and the validator cannot take the schema.
    pub fn for_schema(schema: &Value, relaxed: &[String]) -> Result<Option<PostCheck>, String> {
        if relaxed.is_empty() {
            return Ok(None);
        }
        Ok(Some(PostCheck { validator: validator(schema, relaxed)? }))
    }

    /// Checks a finished answer (its UTF-8 bytes); an error names the keyword it breaks, where
    /// in the schema, and where in the answer.
    pub fn check(&self, answer: &[u8]) -> Result<(), String> {
        let value: Value = serde_json::from_slice(answer)
            .map_err(|e| format!("the answer is not JSON ({e}), which its grammar should have prevented"))?;
        let broken = self.validator.iter_errors(&value).next().map(|error| violation(&error, "the answer"));
        broken.map_or(Ok(()), Err)
    }
}

/// The validator of the whole `schema`, for a grammar that left out what `relaxed` names; an
/// error (naming what was left out) when the validator cannot take the schema either.
pub fn validator(schema: &Value, relaxed: &[String]) -> Result<jsonschema::Validator, String> {
    // Formats are asserted: a `regex`-format string must be a regex, a `date` a date. A
    // format neither llguidance nor the validator knows is an annotation (the spec's rule).
    jsonschema::options().should_validate_formats(true).should_ignore_unknown_formats(true).build(schema).map_err(|e| {
        format!(
            "cannot be honoured: the grammar cannot enforce {} and the schema cannot be checked after generation ({})",
            relaxed.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
            first_line(&e.to_string())
        )
    })
}

/// The error of an answer (`what`: "the answer", "the arguments of call 0", ...) that breaks
/// its schema: the keyword, where in the schema, and where in the answer. Starts with
/// [`super::SCHEMA_VIOLATION`], so that callers can tell it from a grammar's dead end.
pub fn violation(error: &jsonschema::ValidationError<'_>, what: &str) -> String {
    let schema_path = error.schema_path.as_str().to_string();
    let at = match error.instance_path.as_str() {
        "" => what.to_string(),
        p => format!("{what} at `{p}`"),
    };
    format!(
        "{} `{}` (at `{}`): {at}: {}; the model produced a value the grammar could not rule out",
        super::SCHEMA_VIOLATION,
        keyword(&schema_path),
        if schema_path.is_empty() { "/" } else { &schema_path },
        first_line(&error.to_string())
    )
}

/// The keyword a schema path like `/properties/tags/uniqueItems` names: the outermost keyword
/// checked after generation on it (`/then/required` is `then`), else its last keyword, else its
/// last segment. Names after `properties` and the like are skipped: a property may be called
/// `not`.
fn keyword(schema_path: &str) -> &str {
    let segments: Vec<&str> = schema_path.split('/').filter(|s| !s.is_empty()).collect();
    let mut keywords = Vec::new();
    let mut after_named = false;
    for s in &segments {
        if !after_named && KEYWORDS.contains(s) {
            keywords.push(*s);
        }
        after_named = !after_named && NAMED.contains(s);
    }
    keywords
        .iter()
        .find(|k| CHECKED_AFTER.contains(k))
        .or(keywords.last())
        .or(segments.last())
        .copied()
        .unwrap_or("schema")
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_name_what_was_relaxed() {
        let warnings = [
            "Unimplemented keys: [\"not\", \"uniqueItems\"]".to_string(),
            "Unknown format: color".to_string(),
            "oneOf not fully supported, falling back to anyOf. This may cause validation errors".to_string(),
            "Unimplemented keys: [\"uniqueItems\"] (3 times)".to_string(),
            "Unknown format: regex (2 times)".to_string(),
            "something else".to_string(),
        ];
        let want = ["not", "uniqueItems", "format \"color\"", "oneOf (as anyOf)", "format \"regex\"", "something else"];
        assert_eq!(relaxations(&warnings), want);
    }

    #[test]
    fn keyword_is_the_last_keyword_segment() {
        assert_eq!(keyword("/properties/tags/uniqueItems"), "uniqueItems");
        assert_eq!(keyword("/dependencies/a"), "dependencies");
        assert_eq!(keyword("/properties/not/type"), "type");
        assert_eq!(keyword("/then/properties/a/required"), "then");
        assert_eq!(keyword("/properties/a/not"), "not");
        assert_eq!(keyword("/x-custom"), "x-custom");
        assert_eq!(keyword(""), "schema");
    }
}
