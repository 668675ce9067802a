# lib/lmport/generated/ is written by `lmport codegen --lang elixir` and left as generated.
[
  inputs: ["{mix,.formatter}.exs", "{config,test,examples}/**/*.{ex,exs}", "lib/*.ex", "lib/lmport/*.ex"],
  line_length: 110
]
