//! The two MCP prompts, `create_python_sandbox` and `create_node_sandbox`:
//! arguments `sandbox_name` (required) and `namespace` (default
//! `default`), and a user message telling the model which tools to call
//! with which arguments.

use serde_json::{json, Map, Value};

use crate::error::RpcError;
use moat_proto::names::validate_name;

struct Prompt {
    name: &'static str,
    title: &'static str,
    language: &'static str,
    image: &'static str,
    repl_language: &'static str,
}

const PROMPTS: [Prompt; 2] = [
    Prompt {
        name: "create_python_sandbox",
        title: "Create a Python sandbox",
        language: "Python",
        image: "microsandbox/python",
        repl_language: "python",
    },
    Prompt {
        name: "create_node_sandbox",
        title: "Create a Node.js sandbox",
        language: "Node.js",
        image: "microsandbox/node",
        repl_language: "nodejs",
    },
];

fn description(p: &Prompt) -> String {
    format!(
        "Start a {} sandbox and use it to run code safely",
        p.language
    )
}

/// `prompts/list`'s result.
pub fn list(version: &str) -> Value {
    let prompts: Vec<Value> = PROMPTS
        .iter()
        .map(|p| {
            let mut v = json!({
                "name": p.name,
                "description": description(p),
                "arguments": [
                    {"name": "sandbox_name", "description": "Name for the sandbox (letters, digits, '-', '_')", "required": true},
                    {"name": "namespace", "description": "Namespace to create it in (default: \"default\")", "required": false}
                ]
            });
            if super::has_structured_output(version) {
                v["title"] = json!(p.title);
            }
            v
        })
        .collect();
    json!({ "prompts": prompts })
}

/// `prompts/get`.
pub fn get(params: Option<Value>) -> Result<Value, RpcError> {
    let invalid = |m: String| RpcError::invalid_params(m);
    let Some(Value::Object(mut params)) = params else {
        return Err(invalid(
            "prompts/get needs params {\"name\": prompt, \"arguments\": {...}}".to_owned(),
        ));
    };
    let name = match params.remove("name") {
        Some(Value::String(name)) => name,
        _ => {
            return Err(invalid(
                "prompts/get: \"name\" must be a prompt name".to_owned(),
            ))
        }
    };
    let Some(prompt) = PROMPTS.iter().find(|p| p.name == name) else {
        let shown: String = name.chars().take(64).collect();
        return Err(invalid(format!(
            "unknown prompt {shown:?}; prompts: {}",
            PROMPTS.map(|p| p.name).join(", ")
        )));
    };
    let arguments = match params.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(arguments)) => arguments,
        Some(_) => {
            return Err(invalid(
                "prompts/get: \"arguments\" must be an object".to_owned(),
            ))
        }
    };
    let arg = |key: &str| match arguments.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!(
            "{name}: argument {key:?} must be a string"
        ))),
    };
    let sandbox = arg("sandbox_name")?
        .ok_or_else(|| invalid(format!("{name}: argument \"sandbox_name\" is required")))?;
    let namespace = arg("namespace")?.unwrap_or_else(|| "default".to_owned());
    validate_name("sandbox name", &sandbox).map_err(|e| invalid(format!("{name}: {e}")))?;
    validate_name("namespace", &namespace).map_err(|e| invalid(format!("{name}: {e}")))?;
    let start_args = json!({
        "sandbox": sandbox, "namespace": namespace,
        "config": {"image": prompt.image, "memory": 512, "cpus": 1}
    });
    let text = format!(
        "Create a {lang} sandbox named \"{sandbox}\" in namespace \"{namespace}\" and use it to run code.\n\n\
         1. Call the sandbox_start tool with {start_args}. It returns once the sandbox is ready.\n\
         2. Run {lang} code with sandbox_run_code (sandbox \"{sandbox}\", namespace \"{namespace}\", \
         language \"{repl}\"). Variables, imports and functions persist between calls.\n\
         3. Run programs with sandbox_run_command (command plus args, no shell; use command \"sh\" \
         with args [\"-c\", \"...\"] for pipes). Check usage with sandbox_get_metrics.\n\
         4. When finished, call sandbox_stop with {{\"sandbox\": \"{sandbox}\", \"namespace\": \"{namespace}\"}} \
         to free its resources.\n\n\
         If a tool result has isError true, read its message: it says what to change.",
        lang = prompt.language,
        repl = prompt.repl_language,
    );
    Ok(json!({
        "description": description(prompt),
        "messages": [{"role": "user", "content": {"type": "text", "text": text}}]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_prompts_with_arguments() {
        let l = list("2025-11-25");
        let names: Vec<&str> = l["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["create_python_sandbox", "create_node_sandbox"]);
        assert_eq!(l["prompts"][0]["arguments"][0]["name"], "sandbox_name");
        assert_eq!(l["prompts"][0]["arguments"][0]["required"], true);
        assert!(list("2024-11-05")["prompts"][0].get("title").is_none());
    }

    #[test]
    fn get_fills_in_the_arguments() {
        let r = get(Some(json!({"name": "create_node_sandbox", "arguments": {"sandbox_name": "web", "namespace": "team1"}}))).unwrap();
        let text = r["messages"][0]["content"]["text"].as_str().unwrap();
        assert!(
            text.contains("\"web\"")
                && text.contains("team1")
                && text.contains("microsandbox/node"),
            "{text}"
        );
        assert_eq!(r["messages"][0]["role"], "user");
        let r = get(Some(
            json!({"name": "create_python_sandbox", "arguments": {"sandbox_name": "py"}}),
        ))
        .unwrap();
        assert!(r["messages"][0]["content"]["text"]
            .as_str()
            .unwrap()
            .contains("\"default\""));
    }

    #[test]
    fn bad_requests_are_invalid_params() {
        for params in [
            json!({"name": "nope"}),
            json!({"name": "create_python_sandbox"}),
            json!({"name": "create_python_sandbox", "arguments": {"sandbox_name": "a/b"}}),
            json!({"name": "create_python_sandbox", "arguments": {"sandbox_name": 3}}),
            json!({"arguments": {}}),
        ] {
            assert_eq!(
                get(Some(params.clone())).unwrap_err().code().code(),
                -32602,
                "{params}"
            );
        }
        assert!(get(None).is_err());
    }
}
