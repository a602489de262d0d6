//! Function tools on `/v1/responses`: `tools` (`{"type": "function", "name", "parameters",
//! ...}`, flat, unlike chat's `{"function": {...}}`) and `tool_choice` are read into the chat
//! path's [`Tools`], and an answer that is calls of them becomes `function_call` output items.
//! Other tool types (web search, file search, ...) are refused naming the field.

use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::fields::kind;
use super::tools::{self, Tools};

/// Reads the Responses API's `tools` and `tool_choice` from `obj`; `None` without tools.
pub fn parse(obj: &Map<String, Value>) -> Result<Option<Tools>, ApiError> {
    let mut chat = Map::new();
    match obj.get("tools") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let mut list = Vec::with_capacity(items.len());
            for (i, tool) in items.iter().enumerate() {
                list.push(chat_tool(tool, i)?);
            }
            chat.insert("tools".into(), Value::Array(list));
        }
        Some(v) => return Err(ApiError::param("tools", format!("must be a list of function tools, got {}", kind(v)))),
    }
    match obj.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::param("tool_choice.type", "must be \"function\""));
            }
            let name = o.get("name").cloned().unwrap_or(Value::Null);
            chat.insert("tool_choice".into(), json!({"type": "function", "function": {"name": name}}));
        }
        Some(v) => {
            chat.insert("tool_choice".into(), v.clone());
        }
    }
    if let Some(p) = obj.get("parallel_tool_calls") {
        chat.insert("parallel_tool_calls".into(), p.clone());
    }
    // The chat parser's field names, in this API's shape.
    tools::parse(&chat).map_err(|mut e| {
        e.param = e.param.map(|p| p.replace(".function.", ".").replace(".function", ""));
        e
    })
}

/// One Responses function tool in chat's shape; errors name `tools[i].<field>`.
fn chat_tool(tool: &Value, i: usize) -> Result<Value, ApiError> {
    let at = |f: &str| format!("tools[{i}].{f}");
    let Value::Object(t) = tool else {
        return Err(ApiError::param(&format!("tools[{i}]"), format!("must be an object, got {}", kind(tool))));
    };
    match t.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(ApiError::param(&at("type"), format!("`{other}` tools are not supported (only \"function\")")))
        }
        None => return Err(ApiError::param(&at("type"), "is required (\"function\")")),
    }
    let mut function = Map::new();
    for key in ["name", "description", "parameters", "strict"] {
        if let Some(v) = t.get(key) {
            function.insert(key.into(), v.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// The `function_call` output item of one call, with a fresh id; `status`: `in_progress`
/// (streaming, arguments to come) or `completed`.
pub fn function_call_item(name: &str, arguments: &str, status: &str) -> Value {
    let id = format!("{:032x}", rand::random::<u128>());
    json!({
        "type": "function_call",
        "id": format!("fc_{id}"),
        "call_id": format!("call_{id}"),
        "name": name,
        "arguments": arguments,
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: Value) -> Result<Option<Tools>, ApiError> {
        parse(body.as_object().expect("object"))
    }

    #[test]
    fn reads_function_tools_and_names_bad_fields() {
        let weather = json!({"type": "function", "name": "get_weather", "parameters": {"type": "object"}});
        let t = parsed(json!({"tools": [weather], "tool_choice": {"type": "function", "name": "get_weather"}}))
            .expect("ok")
            .expect("tools");
        assert_eq!(t.choice, tools::ToolChoice::Named("get_weather".into()));
        assert_eq!(t.functions[0].0, "get_weather");
        assert_eq!(parsed(json!({})).expect("ok"), None);
        let cases = [
            (json!({"tools": 1}), "tools"),
            (json!({"tools": [{"type": "web_search"}]}), "tools[0].type"),
            (json!({"tools": [{"type": "function"}]}), "tools[0].name"),
            (json!({"tools": [{"type": "function", "name": "f", "parameters": 2}]}), "tools[0].parameters"),
            (json!({"tools": [weather], "tool_choice": "maybe"}), "tool_choice"),
            (json!({"tools": [weather], "tool_choice": {"type": "function", "name": "g"}}), "tool_choice.name"),
        ];
        for (body, param) in cases {
            match parsed(body.clone()) {
                Err(e) => assert_eq!(e.param.as_deref(), Some(param), "{body}"),
                Ok(t) => panic!("{body}: {t:?}"),
            }
        }
    }
}
