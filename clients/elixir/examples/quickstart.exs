# mix run examples/quickstart.exs — the examples of README.md / docs/clients/elixir.md, runnable.

# 1. A script: a worker for the length of one function.
LMPort.run(fn worker ->
  llm = LMPort.llm!(worker, "smollm2")

  [output] =
    LMPort.generate!(worker, llm, "The capital of France is",
      sampling_params: [max_tokens: 16, temperature: 0.0]
    )

  IO.puts("generate: " <> hd(output["outputs"])["text"])

  messages = [%{"role" => "user", "content" => "Write a haiku about the sea."}]

  # 2. Streaming: a lazy Stream of deltas; halting it early cancels the request in the worker.
  worker
  |> LMPort.chat!(llm, messages, stream: true, sampling_params: [max_tokens: 48])
  |> Stream.map(fn %{"outputs" => [delta]} -> delta["text"] end)
  |> Enum.each(&IO.write/1)

  IO.puts("")
end)

# 3. Supervised: a named worker in a supervision tree (usually your application's).
{:ok, _sup} = Supervisor.start_link([{LMPort.Worker, name: MyApp.LLM}], strategy: :one_for_one)
llm = LMPort.llm!(MyApp.LLM, "smollm2")

results =
  ["Red", "Green", "Blue"]
  |> Task.async_stream(
    &LMPort.generate!(MyApp.LLM, llm, "#{&1} is a colour that", sampling_params: [max_tokens: 12]),
    timeout: 60_000
  )
  |> Enum.map(fn {:ok, [out]} -> out["prompt"] <> hd(out["outputs"])["text"] end)

Enum.each(results, &IO.puts/1)

case LMPort.generate(MyApp.LLM, llm, "Go on forever:",
       sampling_params: [max_tokens: 4000, ignore_eos: true],
       timeout: 500
     ) do
  {:error, %LMPort.Error{code: code}} -> IO.puts("timeout: #{code}")
  {:ok, _} -> IO.puts("finished within 500 ms")
end

# 4. A pool: two workers under one supervisor, the same LMPort calls with {:pool, name}.
{:ok, _pool} = LMPort.Pool.start_link(name: MyApp.LLMPool, size: 2)
pool_llm = LMPort.llm!({:pool, MyApp.LLMPool}, "smollm2", max_model_len: 1024)

["Red", "Green", "Blue", "White"]
|> Task.async_stream(
  &LMPort.generate!({:pool, MyApp.LLMPool}, pool_llm, "#{&1} is a colour that",
    sampling_params: [max_tokens: 12]
  ),
  timeout: 60_000
)
|> Enum.each(fn {:ok, [out]} -> IO.puts("pool: " <> out["prompt"] <> hd(out["outputs"])["text"]) end)

# 5. Embeddings: one vector per input (docs/embeddings.md).
LMPort.run(fn worker ->
  llm = LMPort.llm!(worker, "all-MiniLM-L6-v2")

  %{"data" => [%{"embedding" => vector}], "usage" => usage} =
    LMPort.embed!(worker, llm, ["Hello"], pooling: "mean")

  IO.inspect({length(vector), usage}, label: "embed")
end)
