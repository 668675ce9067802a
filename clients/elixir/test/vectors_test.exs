defmodule LMPort.VectorsTest do
  @moduledoc "The shared protocol vectors (tests/vectors/*.json, written by `python -m lmport.bridge.vectors`)."
  use ExUnit.Case, async: true

  alias LMPort.Msgpack
  alias LMPort.Msgpack.Bin

  @dir Path.expand("../../../tests/vectors", __DIR__)

  defp load(name), do: @dir |> Path.join(name) |> File.read!() |> LMPort.TestJSON.decode!()

  # Tagged JSON meaning -> the Elixir value the codec must produce: {"$float": x} is a float, {"$bin": hex} bytes.
  defp untag(%{"$float" => x} = tagged) when map_size(tagged) == 1, do: x * 1.0

  defp untag(%{"$bin" => hex} = tagged) when map_size(tagged) == 1,
    do: %Bin{data: Base.decode16!(hex, case: :mixed)}

  defp untag(%{} = map), do: Map.new(map, fn {k, v} -> {k, untag(v)} end)
  defp untag(list) when is_list(list), do: Enum.map(list, &untag/1)
  defp untag(other), do: other

  test "value vectors decode to their meaning and encode to their bytes" do
    %{"protocol" => 1, "vectors" => vectors} = load("values.json")
    assert length(vectors) > 40

    for v <- vectors do
      bytes = Base.decode16!(v["msgpack"], case: :lower)
      expected = untag(v["value"])
      assert Msgpack.decode!(bytes) === expected, "decode #{v["name"]}"

      if Map.get(v, "encode", true) do
        assert IO.iodata_to_binary(Msgpack.encode!(expected)) == bytes, "encode #{v["name"]}"
      end
    end
  end

  test "message vectors: every frame is {:packet, 4} framing around the canonical encoding" do
    %{"vectors" => vectors} = load("messages.json")
    types = vectors |> Enum.map(& &1["message"]["type"]) |> MapSet.new()
    assert MapSet.subset?(MapSet.new(~w(hello request cancel response chunk event)), types)

    for v <- vectors do
      <<len::32, payload::binary>> = Base.decode16!(v["frame"], case: :lower)
      assert byte_size(payload) == len, v["name"]
      expected = untag(v["message"])
      assert Msgpack.decode!(payload) === expected, "decode #{v["name"]}"
      assert IO.iodata_to_binary(Msgpack.encode!(expected)) == payload, "encode #{v["name"]}"
    end
  end

  test "every worker error code in the vectors maps onto LMPort.Error" do
    %{"vectors" => vectors} = load("messages.json")

    errors =
      for %{"message" => %{"type" => "response", "ok" => false, "error" => e}} <- vectors,
          do: LMPort.Error.from_wire(untag(e))

    assert length(errors) == length(LMPort.Schema.error_codes())

    assert Enum.map(errors, & &1.code) |> Enum.sort() ==
             LMPort.Schema.error_codes() |> Enum.map(& &1["code"]) |> Enum.sort()

    assert %LMPort.Error{details: %{"field" => "sampling_params.temperature"}} =
             Enum.find(errors, &(&1.code == "invalid_params"))

    assert %LMPort.Error{retryable: true} = Enum.find(errors, &(&1.code == "overloaded"))
    assert %LMPort.Error{traceback: "Traceback" <> _} = Enum.find(errors, &(&1.code == "internal"))
  end
end
