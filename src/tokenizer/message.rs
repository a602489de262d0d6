//! One message of a chat conversation, as chat templates see it: OpenAI's shape, so that a
//! server request and a library caller build the same value and the template renders both.

use serde::{Deserialize, Serialize};

/// One message of a chat conversation.
///
/// ```
/// use tulu::{ChatMessage, ToolCall};
/// let call = ToolCall::function("call_0", "get_weather", serde_json::json!({"city": "Paris"}));
/// let conversation = vec![
///     ChatMessage::user("What is the weather in Paris?"),
///     ChatMessage::assistant("").with_tool_calls(vec![call]),
///     ChatMessage::tool("call_0", r#"{"temperature": 21}"#),
/// ];
/// assert_eq!(conversation[2].role, "tool");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` (or `ipython`, Llama 3.1's name for tool results).
    pub role: String,
    /// The message text.
    pub content: String,
    /// The tool calls an assistant turn made; templates that render tools show them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool result: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    /// A `tool` message: the result of the call `call_id`.
    pub fn tool(call_id: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { tool_call_id: Some(call_id.into()), ..Self::new("tool", content) }
    }

    /// The same message with these tool calls (an assistant turn that called tools).
    pub fn with_tool_calls(mut self, calls: Vec<ToolCall>) -> Self {
        self.tool_calls = calls;
        self
    }
}

/// A call an assistant made to one of the tools it was offered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolCall {
    /// The call's id, which its result names (`tool_call_id`).
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function called and its arguments.
    pub function: FunctionCall,
}

impl ToolCall {
    /// A call of function `name` with `arguments` (a JSON object).
    pub fn function(id: impl Into<String>, name: impl Into<String>, arguments: serde_json::Value) -> Self {
        ToolCall { id: id.into(), kind: "function".into(), function: FunctionCall { name: name.into(), arguments } }
    }
}

/// The function of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments as a JSON value (templates render them with `tojson`, as transformers
    /// does; OpenAI's wire form, a JSON string, is parsed by the server).
    pub arguments: serde_json::Value,
}
