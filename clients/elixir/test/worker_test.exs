defmodule LMPort.WorkerTest do
  @moduledoc "The generated API and the transport against the real worker on the bundled model."
  use ExUnit.Case, async: false
  import LMPort.TestHelpers

  @moduletag timeout: 300_000
  @moduletag capture_log: true
  @worker LMPort.WorkerTest.Worker
  @long [max_tokens: 1_000, ignore_eos: true]

  setup_all do
    start_supervised!({LMPort.Worker, worker_opts(name: @worker)})
    %{llm: LMPort.llm!(@worker, "smollm2", kv_cache_memory_bytes: 256 * 1024 * 1024, max_model_len: 2048)}
  end

  defp stats(llm), do: LMPort.stats!(@worker, llm: llm)

  defp wait_idle(llm),
    do: wait_until(fn -> stats(llm)["num_running"] == 0 end, 20_000, "the engine to go idle")

  test "the generated API matches the running worker's manifest" do
    assert {:ok, manifest} = LMPort.Worker.call(@worker, "describe", %{})
    assert manifest["protocol"] == LMPort.Schema.protocol()

    for method <- manifest["methods"] do
      spec = LMPort.Schema.method(method["name"])

      assert Enum.map(spec["params"], & &1["name"]) == Enum.map(method["params"], & &1["name"]),
             method["name"]
    end
  end

  test "a LoRA adapter (lora_request) changes the output; an engine without enable_lora refuses it",
       %{llm: llm} do
    {:ok, python} = LMPort.Python.find([])
    root = LMPort.Python.checkout_root() || Path.expand("../..", File.cwd!())
    dir = Path.join(System.tmp_dir!(), "lmport-lora-#{System.unique_integer([:positive])}")
    {_, 0} = System.cmd(python, [Path.join([root, "tests", "make_lora_adapter.py"]), dir])
    adapter = %{lora_name: "smol-test", lora_int_id: 1, lora_path: dir}

    lora =
      LMPort.llm!(@worker, "smollm2",
        kv_cache_memory_bytes: 256 * 1024 * 1024,
        max_model_len: 2048,
        enable_lora: true,
        max_lora_rank: 8
      )

    greedy = [max_tokens: 10, temperature: 0]

    [base, tuned] =
      LMPort.generate!(@worker, lora, ["The capital of France is", "The capital of France is"],
        sampling_params: greedy,
        lora_request: [nil, adapter]
      )

    assert hd(base["outputs"])["text"] != hd(tuned["outputs"])["text"]

    assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => "lora_request"}}} =
             LMPort.generate(@worker, llm, "x", sampling_params: greedy, lora_request: adapter)

    LMPort.release!(@worker, lora)
  end

  test "generate returns plain RequestOutput maps", %{llm: llm} do
    outputs =
      LMPort.generate!(@worker, llm, ["The capital of France is", "1, 2, 3,"],
        sampling_params: [max_tokens: 6, temperature: 0]
      )

    assert [%{"prompt" => "The capital of France is", "finished" => true} = first, %{"prompt" => "1, 2, 3,"}] =
             outputs

    assert [%{"text" => text, "token_ids" => ids, "finish_reason" => reason}] = first["outputs"]
    assert is_binary(text) and text != "" and length(ids) in 1..6 and reason in ["stop", "length"]
  end

  test "chat applies the chat template", %{llm: llm} do
    messages = [%{"role" => "user", "content" => "Say hello."}]

    assert [%{"outputs" => [%{"text" => text}], "prompt_token_ids" => ids}] =
             LMPort.chat!(@worker, llm, messages, sampling_params: [max_tokens: 6, temperature: 0])

    assert is_binary(text) and length(ids) > 5
  end

  test "structured outputs take keyword lists and maps; a bad regex names the field", %{llm: llm} do
    schema = %{
      "type" => "object",
      "properties" => %{"city" => %{"type" => "string", "maxLength" => 20}, "ok" => %{"type" => "boolean"}},
      "required" => ["city", "ok"]
    }

    messages = [%{"role" => "user", "content" => "Describe a city as JSON."}]

    assert [%{"outputs" => [%{"text" => text, "finish_reason" => "stop"}]}] =
             LMPort.chat!(@worker, llm, messages,
               sampling_params: [max_tokens: 60, temperature: 0, structured_outputs: [json: schema]]
             )

    # Elixir 1.14 has no JSON decoder: the object's shape, field by field
    assert text =~ ~r/^\{\s*"city"\s*:\s*"[^"]{0,20}"\s*,\s*"ok"\s*:\s*(true|false)\s*\}$/

    assert [%{"outputs" => [%{"text" => answer}]}] =
             LMPort.generate!(@worker, llm, "Answer:",
               sampling_params: %{
                 "max_tokens" => 5,
                 "temperature" => 0,
                 "structured_outputs" => %{"choice" => ["left", "right"]}
               }
             )

    assert answer in ["left", "right"]

    assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => field}}} =
             LMPort.generate(@worker, llm, "x", sampling_params: [structured_outputs: [regex: "[a-"]])

    assert field == "sampling_params.structured_outputs.regex"
  end

  test "tool calling: a forced call comes back as plain data, its result goes back as a tool message",
       %{llm: llm} do
    weather = %{
      "type" => "function",
      "function" => %{
        "name" => "get_weather",
        "description" => "Current weather of a city",
        "parameters" => %{
          "type" => "object",
          "properties" => %{"city" => %{"type" => "string", "maxLength" => 30}},
          "required" => ["city"]
        }
      }
    }

    question = [%{"role" => "user", "content" => "What is the weather in Paris?"}]

    assert [%{"outputs" => [%{"tool_calls" => [call]}]}] =
             LMPort.chat!(@worker, llm, question,
               sampling_params: [max_tokens: 40, temperature: 0],
               tools: [weather],
               tool_choice: %{"type" => "function", "function" => %{"name" => "get_weather"}}
             )

    assert %{"id" => "call_" <> _, "function" => %{"name" => "get_weather", "arguments" => arguments}} = call
    assert arguments =~ ~r/^\{\s*"city"\s*:\s*"[^"]{0,30}"\s*\}$/

    conversation =
      question ++
        [
          %{"role" => "assistant", "content" => nil, "tool_calls" => [call]},
          %{"role" => "tool", "tool_call_id" => call["id"], "content" => "18 C and sunny"}
        ]

    assert [%{"outputs" => [%{"text" => reply}]}] =
             LMPort.chat!(@worker, llm, conversation,
               sampling_params: [max_tokens: 8, temperature: 0],
               tools: [weather]
             )

    assert reply != ""

    assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => "tool_choice"}}} =
             LMPort.chat(@worker, llm, question,
               tools: [weather],
               tool_choice: %{"type" => "function", "function" => %{"name" => "nope"}}
             )
  end

  test "embed returns one vector per input; bad input names the field" do
    minilm = LMPort.llm!(@worker, "all-MiniLM-L6-v2", device: "cpu")
    texts = ["A cat sits on the mat.", "Stocks fell sharply.", "The kitten rests on the rug."]

    assert %{"data" => data, "usage" => %{"prompt_tokens" => tokens, "total_tokens" => tokens}} =
             LMPort.embed!(@worker, minilm, texts)

    assert Enum.map(data, & &1["index"]) == [0, 1, 2]
    assert tokens == data |> Enum.map(& &1["prompt_tokens"]) |> Enum.sum()
    [cat, stocks, kitten] = Enum.map(data, & &1["embedding"])
    dot = fn a, b -> Enum.zip_with(a, b, &(&1 * &2)) |> Enum.sum() end
    assert length(cat) == 384 and abs(dot.(cat, cat) - 1) < 1.0e-5
    # the paraphrase is nearer than the unrelated sentence
    assert dot.(cat, kitten) > dot.(cat, stocks)

    assert %{"data" => [%{"embedding" => short}]} =
             LMPort.embed!(@worker, minilm, "x", pooling: "cls", dimensions: 8)

    assert length(short) == 8

    for {input, opts, field} <- [
          {[], [], "input"},
          {"x", [pooling: "max"], "pooling"},
          {"x", [dimensions: 385], "dimensions"}
        ] do
      assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => ^field}}} =
               LMPort.embed(@worker, minilm, input, opts)
    end

    LMPort.release!(@worker, minilm)
  end

  test "tokenize and detokenize round-trip", %{llm: llm} do
    ids = LMPort.tokenize!(@worker, llm, "Hello, Elixir!", add_special_tokens: false)
    assert [_ | _] = ids
    assert Enum.all?(ids, &is_integer/1)
    assert LMPort.detokenize!(@worker, llm, ids) == "Hello, Elixir!"
  end

  test "sampling_params/2 normalises; bad values are refused naming the field" do
    params = LMPort.sampling_params!(@worker, temperature: 0.5, max_tokens: 7, stop: ["\n"])
    assert %{"temperature" => 0.5, "max_tokens" => 7, "stop" => ["\n"], "top_p" => 1.0} = params

    assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => "temperature"}}} =
             LMPort.sampling_params(@worker, temperature: -1)
  end

  test "streamed deltas add up to the non-streamed text", %{llm: llm} do
    sp = [max_tokens: 8, temperature: 0, ignore_eos: true]

    [%{"outputs" => [%{"text" => full}]}] =
      LMPort.generate!(@worker, llm, "Once upon a time", sampling_params: sp)

    deltas =
      LMPort.generate!(@worker, llm, "Once upon a time", sampling_params: sp, stream: true) |> Enum.to_list()

    assert length(deltas) > 1
    assert List.last(deltas)["finished"] == true
    assert Enum.map_join(deltas, fn %{"outputs" => [o]} -> o["text"] end) == full
  end

  test "stream: :with_summary ends the stream with the final response", %{llm: llm} do
    sp = [max_tokens: 6, temperature: 0, ignore_eos: true]

    items =
      LMPort.generate!(@worker, llm, "The sea", sampling_params: sp, stream: :with_summary) |> Enum.to_list()

    {deltas, [{:summary, summary}]} = Enum.split(items, -1)
    assert Enum.all?(deltas, &is_map/1) and List.last(deltas)["finished"] == true
    assert %{"usage" => %{"completion_tokens" => 6}, "requests" => [%{"outputs" => [output]}]} = summary
    assert output["finish_reason"] == "length"

    assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => "stream"}}} =
             LMPort.generate(@worker, llm, "x", stream: :yes)
  end

  test "halting a stream early cancels the request in the worker", %{llm: llm} do
    wait_idle(llm)
    aborted = stats(llm)["requests_aborted"]
    stream = LMPort.generate!(@worker, llm, "Write a long story.", sampling_params: @long, stream: true)
    assert [_, _] = Enum.take(stream, 2)
    wait_until(fn -> stats(llm)["requests_aborted"] == aborted + 1 end, 10_000, "the abort")
    wait_idle(llm)
    # no chunk forwarded before the cancel was handled is left behind in the consumer's mailbox
    refute_received {:lmport, _, _, _}
  end

  test "32 concurrent callers are batched through one worker", %{llm: llm} do
    wait_idle(llm)

    results =
      1..32
      |> Enum.map(fn i ->
        Task.async(fn ->
          LMPort.generate(@worker, llm, "Item #{i} of the list:",
            sampling_params: [max_tokens: 8, temperature: 0]
          )
        end)
      end)
      |> Task.await_many(240_000)

    assert Enum.all?(results, &match?({:ok, [%{"finished" => true}]}, &1))
    # The peak batch: earlier tests run at most 2 sequences at once, so this one did the batching.
    assert stats(llm)["max_num_running"] >= 8
  end

  test "a caller killed mid-generation has its request cancelled", %{llm: llm} do
    wait_idle(llm)
    aborted = stats(llm)["requests_aborted"]
    caller = spawn(fn -> LMPort.generate(@worker, llm, "Tell me everything.", sampling_params: @long) end)
    wait_until(fn -> stats(llm)["num_running"] == 1 end, 20_000, "the request to run")
    Process.exit(caller, :kill)
    wait_until(fn -> stats(llm)["requests_aborted"] == aborted + 1 end, 10_000, "the abort")
    wait_idle(llm)
  end

  test "timeout: 200 ends a long generation with deadline_exceeded; the worker keeps serving", %{llm: llm} do
    {elapsed, result} =
      :timer.tc(fn ->
        LMPort.generate(@worker, llm, "Go on forever:", sampling_params: @long, timeout: 200)
      end)

    assert {:error, %LMPort.Error{code: "deadline_exceeded"}} = result
    assert elapsed < 5_000_000
    wait_idle(llm)
    assert [%{"finished" => true}] = LMPort.generate!(@worker, llm, "Hi", sampling_params: [max_tokens: 2])
  end

  test "config :lmport, timeout: ms is the default deadline of every call", %{llm: llm} do
    Application.put_env(:lmport, :timeout, 200)

    try do
      assert {:error, %LMPort.Error{code: "deadline_exceeded"}} =
               LMPort.generate(@worker, llm, "Go on forever:", sampling_params: @long)
    after
      Application.delete_env(:lmport, :timeout)
    end

    wait_idle(llm)
  end
end
