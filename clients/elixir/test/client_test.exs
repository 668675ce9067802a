defmodule LMPort.ClientTest do
  @moduledoc "What happens before anything reaches a worker: local validation and Python discovery."
  use ExUnit.Case, async: false

  # No worker has this name: a call that passes validation fails with spawn_failed instead.
  @nobody :no_such_lmport_worker

  test "valid options pass validation and reach the transport" do
    assert {:error, %LMPort.Error{code: "spawn_failed"}} =
             LMPort.generate(@nobody, "llm-1", "Hi",
               sampling_params: [temperature: 0, max_tokens: 4, stop: ["\n"]],
               timeout: 500
             )

    assert {:error, %LMPort.Error{code: "spawn_failed"}} =
             LMPort.generate(@nobody, %{"ref" => "llm-1"}, ["a", "b"],
               sampling_params: [[max_tokens: 1], %{"max_tokens" => 2}]
             )

    assert {:error, %LMPort.Error{code: "spawn_failed"}} =
             LMPort.llm(@nobody, "smollm2", dtype: :float32, max_num_seqs: 8)
  end

  test "bad options are refused locally, naming the field" do
    cases = [
      {LMPort.generate(@nobody, "llm-1", "Hi", sampling_params: [temperature: -1.0]),
       "sampling_params.temperature", ">="},
      {LMPort.generate(@nobody, "llm-1", "Hi", sampling_params: [top_p: 0]), "sampling_params.top_p",
       "must be > 0.0, got: 0.0"},
      {LMPort.generate(@nobody, "llm-1", "Hi", sampling_params: [repetition_penalty: 0.0]),
       "sampling_params.repetition_penalty", "must be > 0.0"},
      {LMPort.generate(@nobody, "llm-1", "Hi", sampling_params: [tempreature: 1.0]),
       "sampling_params.tempreature", "is not an option"},
      {LMPort.generate(@nobody, "llm-1", "Hi", sampling_params: [max_tokens: "ten"]),
       "sampling_params.max_tokens", "must be int"},
      {LMPort.generate(@nobody, "llm-1", "Hi", sampling_params: [[max_tokens: 0]]),
       "sampling_params[0].max_tokens", ">="},
      {LMPort.generate(@nobody, "llm-1", "Hi", sampling_params: [output_kind: "sometimes"]),
       "sampling_params.output_kind", "one of"},
      {LMPort.generate(@nobody, "llm-1", "Hi", max_tokens: 3), "max_tokens", "is not an option"},
      {LMPort.generate(@nobody, 42, "Hi"), "llm", "must be handle"},
      {LMPort.llm(@nobody, "smollm2", dtype: "float8"), "dtype", "one of"},
      {LMPort.tokenize(@nobody, "llm-1", "x", timeout: -5), "timeout", "positive integer"},
      {LMPort.tokenize(@nobody, "llm-1", "x", timeout_profile: :forever), "timeout_profile", "one of"},
      {LMPort.tokenize(@nobody, "llm-1", "x", stream: true), "stream", "does not stream"}
    ]

    for {result, field, text} <- cases do
      assert {:error, %LMPort.Error{code: "invalid_params", details: %{"field" => ^field}, message: message}} =
               result

      assert message =~ text, "#{field}: #{message}"
    end

    assert_raise LMPort.Error, ~r/\[invalid_params\].*temperature/, fn ->
      LMPort.sampling_params!(@nobody, temperature: 9.0)
    end
  end

  test "Python discovery: an explicit choice that does not work is a clear error" do
    # start_link's {:error, reason} comes with an exit signal from the failed GenServer.
    Process.flag(:trap_exit, true)

    assert {:error, %LMPort.Error{code: "spawn_failed", message: message}} =
             LMPort.Worker.start_link(python: "/nonexistent/python3")

    assert message =~ "/nonexistent/python3"

    System.put_env("LMPORT_PYTHON", "/nonexistent/env-python")

    try do
      assert {:error, %LMPort.Error{message: message}} = LMPort.Worker.start_link([])
      assert message =~ "LMPORT_PYTHON"
    after
      System.delete_env("LMPORT_PYTHON")
    end

    assert {:ok, python} = LMPort.Python.find([])
    assert File.exists?(python)
  end

  test "a worker that does not speak lmport fails to start with a clear error" do
    Process.flag(:trap_exit, true)

    assert {:error, %LMPort.Error{code: "spawn_failed", message: message}} =
             LMPort.Worker.start_link(python: "/bin/false")

    assert message =~ "before hello"
  end
end
