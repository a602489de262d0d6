//! The request fields that constrain a completion's text (structured outputs): OpenAI's
//! `response_format` (`text`, `json_object`, `json_schema`), vLLM's `structured_outputs`
//! object (`json`, `regex`, `choice`, `grammar`, `json_object`) and its older top-level
//! `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. At most one may be set.
//! Each becomes a [`Constraint`] with the parameter its errors name, so that a schema that
//! does not compile is a 400 naming the field it came from.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::grammar::Constraint;

/// A request's constraint and the parameter it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestConstraint {
    /// What the text must match.
    pub constraint: Constraint,
    /// The request parameter that set it (`response_format.json_schema.schema`,
    /// `structured_outputs.regex`, `guided_choice`, ...).
    pub param: String,
}

/// The constraint `body` sets, if any; an error names the malformed field, or the second of
/// two constraints.
pub fn parse(body: &Map<String, Value>) -> Result<Option<RequestConstraint>, ApiError> {
    let mut found: Vec<RequestConstraint> = Vec::new();
    if let Some(v) = present(body, "response_format") {
        found.extend(response_format(v)?);
    }
    if let Some(v) = present(body, "structured_outputs") {
        let Value::Object(fields) = v else {
            return Err(ApiError::param("structured_outputs", format!("must be an object, got {}", kind(v))));
        };
        found.extend(vllm_fields(fields, "structured_outputs.", "")?);
    }
    found.extend(vllm_fields(body, "", "guided_")?);
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(ApiError::param(
            &found[1].param,
            format!("cannot be combined with `{}`: a request takes one output constraint", found[0].param),
        )),
    }
}

fn present<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

/// OpenAI's `response_format`.
fn response_format(v: &Value) -> Result<Option<RequestConstraint>, ApiError> {
    let ty = v.get("type").and_then(Value::as_str);
    let c = |constraint, param: &str| Ok(Some(RequestConstraint { constraint, param: param.into() }));
    match ty {
        Some("text") => Ok(None),
        Some("json_object") => c(Constraint::JsonObject, "response_format"),
        Some("json_schema") => {
            let param = "response_format.json_schema";
            let Some(Value::Object(js)) = v.get("json_schema") else {
                return Err(ApiError::param(param, "is required (an object with `name` and `schema`)"));
            };
            if let Some(s) = js.get("strict").filter(|s| !s.is_null() && !s.is_boolean()) {
                return Err(ApiError::param(&format!("{param}.strict"), format!("must be a boolean, got {}", kind(s))));
            }
            // `strict` or not, the schema is enforced: tulu has no looser mode to offer.
            match present(js, "schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    c(Constraint::JsonSchema(schema.clone()), "response_format.json_schema.schema")
                }
                Some(s) => {
                    Err(ApiError::param(&format!("{param}.schema"), format!("must be an object, got {}", kind(s))))
                }
                None => Err(ApiError::param(&format!("{param}.schema"), "is required")),
            }
        }
        _ => Err(ApiError::param("response_format.type", "must be `text`, `json_object` or `json_schema`")),
    }
}

/// vLLM's constraint fields, named `{prefix}{stem}{name}`: `json` (a schema, or its JSON text),
/// `regex`, `choice`, `grammar` (Lark) and `json_object`.
fn vllm_fields(obj: &Map<String, Value>, prefix: &str, stem: &str) -> Result<Vec<RequestConstraint>, ApiError> {
    let mut found = Vec::new();
    for name in ["json", "regex", "choice", "grammar", "json_object"] {
        let key = format!("{stem}{name}");
        let Some(v) = present(obj, &key) else { continue };
        let param = format!("{prefix}{key}");
        let bad = |what: &str| ApiError::param(&param, format!("must be {what}, got {}", kind(v)));
        let constraint = match (name, v) {
            ("json", Value::Object(_) | Value::Bool(_)) => Constraint::JsonSchema(v.clone()),
            ("json", Value::String(text)) => Constraint::JsonSchema(
                serde_json::from_str(text).map_err(|e| ApiError::param(&param, format!("is not valid JSON: {e}")))?,
            ),
            ("json", _) => return Err(bad("a JSON schema (an object or its JSON text)")),
            ("regex", Value::String(rx)) => Constraint::Regex(rx.clone()),
            ("regex", _) => return Err(bad("a string")),
            ("grammar", Value::String(g)) => Constraint::Lark(g.clone()),
            ("grammar", _) => return Err(bad("a Lark grammar string")),
            ("choice", Value::Array(items)) => Constraint::Choice(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, s)| match s {
                        Value::String(s) => Ok(s.clone()),
                        v => {
                            Err(ApiError::param(&format!("{param}[{i}]"), format!("must be a string, got {}", kind(v))))
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            ("choice", _) => return Err(bad("a list of strings")),
            ("json_object", Value::Bool(false)) => continue,
            ("json_object", Value::Bool(true)) => Constraint::JsonObject,
            (_, _) => return Err(bad("a boolean")),
        };
        found.push(RequestConstraint { constraint, param });
    }
    Ok(found)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: &str) -> Result<Option<RequestConstraint>, ApiError> {
        let v: Value = serde_json::from_str(body).expect("JSON");
        parse(v.as_object().expect("object"))
    }

    #[test]
    fn every_field_becomes_its_constraint_with_its_param() {
        let schema = serde_json::json!({"type": "object"});
        let cases = [
            (r#"{"response_format": {"type": "text"}}"#, None),
            (r#"{"response_format": {"type": "json_object"}}"#, Some((Constraint::JsonObject, "response_format"))),
            (
                r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": {"type": "object"}}}}"#,
                Some((Constraint::JsonSchema(schema.clone()), "response_format.json_schema.schema")),
            ),
            (
                r#"{"structured_outputs": {"regex": "a+"}}"#,
                Some((Constraint::Regex("a+".into()), "structured_outputs.regex")),
            ),
            (
                r#"{"structured_outputs": {"choice": ["a", "b"]}}"#,
                Some((Constraint::Choice(vec!["a".into(), "b".into()]), "structured_outputs.choice")),
            ),
            (r#"{"guided_json": "{\"type\": \"object\"}"}"#, Some((Constraint::JsonSchema(schema), "guided_json"))),
            (
                r#"{"guided_grammar": "start: \"x\""}"#,
                Some((Constraint::Lark("start: \"x\"".into()), "guided_grammar")),
            ),
            (r#"{"guided_json_object": true}"#, Some((Constraint::JsonObject, "guided_json_object"))),
            (r#"{"guided_regex": null}"#, None),
        ];
        for (body, want) in cases {
            let got = parsed(body).unwrap_or_else(|e| panic!("{body}: {e:?}"));
            assert_eq!(got.map(|c| (c.constraint, c.param)), want.map(|(c, p)| (c, p.to_string())), "{body}");
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        let cases = [
            (r#"{"response_format": {"type": "yaml"}}"#, "response_format.type"),
            (r#"{"response_format": {"type": "json_schema"}}"#, "response_format.json_schema"),
            (
                r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}"#,
                "response_format.json_schema.schema",
            ),
            (
                r#"{"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}"#,
                "response_format.json_schema.schema",
            ),
            (r#"{"structured_outputs": {"choice": ["a", 2]}}"#, "structured_outputs.choice[1]"),
            (r#"{"structured_outputs": 1}"#, "structured_outputs"),
            (r#"{"guided_json": "{nope"}"#, "guided_json"),
            (r#"{"guided_regex": 5}"#, "guided_regex"),
            (r#"{"guided_regex": "a", "response_format": {"type": "json_object"}}"#, "guided_regex"),
        ];
        for (body, param) in cases {
            match parsed(body) {
                Err(e) => assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message),
                Ok(c) => panic!("{body} parsed: {c:?}"),
            }
        }
    }
}
