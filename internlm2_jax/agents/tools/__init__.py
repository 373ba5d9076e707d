"""Tools for agents (agents.md §2.5): `@tool` makes a `Tool` from a typed, documented function; `ToolExecutor` holds
the declared tools, announces them (OpenAI `tools` list, system turns) and turns each parsed `Call` into a
`ToolResult`. Built-ins, all offline: `calculator`, `search_docs` / `open_doc` over the standard library's
documentation, and `PythonTool`, the sandboxed interpreter for `<|interpreter|>` calls.

    executor = ToolExecutor(BUILTIN_TOOLS, interpreter=PythonTool())
    turns = executor.system_turns()                       # or executor.openai_tools() for a server
    parsed = protocol.parse_ids(ids, tokenizer, tools=executor.specs())
    result = executor(parsed.call)                        # never raises for what the tool does
"""

from internlm2_jax.agents.tools.base import Tool, ToolError, ToolExecutor, tool
from internlm2_jax.agents.tools.calculator import calculator as _calculator
from internlm2_jax.agents.tools.docs import DocIndex, Document, open_doc, search_docs
from internlm2_jax.agents.tools.python import PythonTool
from internlm2_jax.agents.validate import argument_errors

# The calculator Tool is not re-exported under its own name: `tools.calculator` stays the module (an attribute of the
# same name would shadow it, and `import ...tools.calculator as m` would then give the Tool).
BUILTIN_TOOLS = (_calculator, search_docs, open_doc)

__all__ = ["BUILTIN_TOOLS", "DocIndex", "Document", "PythonTool", "Tool", "ToolError", "ToolExecutor",
           "argument_errors", "open_doc", "search_docs", "tool"]
