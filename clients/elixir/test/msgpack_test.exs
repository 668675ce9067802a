defmodule LMPort.MsgpackTest do
  use ExUnit.Case, async: true

  alias LMPort.Msgpack
  alias LMPort.Msgpack.{Bin, Ext}

  # Bytes as msgpack-python 1.x writes them (packb(value, use_bin_type=True)).
  @known [
    {nil, "c0"},
    {true, "c3"},
    {false, "c2"},
    {0, "00"},
    {127, "7f"},
    {128, "cc80"},
    {255, "ccff"},
    {256, "cd0100"},
    {65_535, "cdffff"},
    {65_536, "ce00010000"},
    {4_294_967_295, "ceffffffff"},
    {4_294_967_296, "cf0000000100000000"},
    {9_007_199_254_740_991, "cf001fffffffffffff"},
    {18_446_744_073_709_551_615, "cfffffffffffffffff"},
    {-1, "ff"},
    {-32, "e0"},
    {-33, "d0df"},
    {-128, "d080"},
    {-129, "d1ff7f"},
    {-32_768, "d18000"},
    {-32_769, "d2ffff7fff"},
    {-2_147_483_648, "d280000000"},
    {-2_147_483_649, "d3ffffffff7fffffff"},
    {-9_223_372_036_854_775_808, "d38000000000000000"},
    {1.5, "cb3ff8000000000000"},
    {1.0e300, "cb7e37e43c8800759c"},
    {"", "a0"},
    {String.duplicate("a", 31), "bf" <> String.duplicate("61", 31)},
    {String.duplicate("a", 32), "d920" <> String.duplicate("61", 32)},
    {"é日本🎉", "acc3a9e697a5e69cacf09f8e89"},
    {String.duplicate("x", 256), "da0100" <> String.duplicate("78", 256)},
    {%Bin{data: <<0, 255>>}, "c40200ff"},
    {[], "90"},
    {[1, [2, [3]]], "920192029103"},
    {Enum.to_list(0..15), "dc0010000102030405060708090a0b0c0d0e0f"},
    {%{}, "80"},
    {%{"a" => 1}, "81a16101"}
  ]

  test "encodes exactly as msgpack-python and decodes back" do
    for {value, hex} <- @known do
      bytes = Base.decode16!(hex, case: :lower)
      assert IO.iodata_to_binary(Msgpack.encode!(value)) == bytes, "encode #{inspect(value, limit: 5)}"
      assert Msgpack.decode!(bytes) == value, "decode #{hex}"
    end
  end

  test "atoms other than nil/true/false are encoded as strings; decoding never makes atoms" do
    assert Msgpack.decode!(IO.iodata_to_binary(Msgpack.encode!(%{type: :request}))) == %{"type" => "request"}
  end

  test "non-finite floats travel as atoms" do
    for v <- [:nan, :infinity, :neg_infinity] do
      assert v |> Msgpack.encode!() |> IO.iodata_to_binary() |> Msgpack.decode!() == v
    end

    # float32 forms decode too
    assert Msgpack.decode!(<<0xCA, 0x7F800000::32>>) == :infinity
    assert Msgpack.decode!(<<0xCA, 1.5::float-32>>) == 1.5
  end

  test "large containers use 16/32-bit headers" do
    list = Enum.to_list(1..70_000)
    map = Map.new(1..20, &{"k#{&1}", &1})
    bin = %Bin{data: :binary.copy(<<1>>, 70_000)}

    for value <- [list, map, bin, String.duplicate("é", 40_000)] do
      assert value |> Msgpack.encode!() |> IO.iodata_to_binary() |> Msgpack.decode!() == value
    end

    assert <<0xDD, 70_000::32, _::binary>> = IO.iodata_to_binary(Msgpack.encode!(list))
    assert <<0xDE, 20::16, _::binary>> = IO.iodata_to_binary(Msgpack.encode!(map))
  end

  test "ext values round-trip" do
    for n <- [1, 2, 4, 8, 16, 3, 300] do
      ext = %Ext{type: 5, data: :binary.copy(<<7>>, n)}
      assert ext |> Msgpack.encode!() |> IO.iodata_to_binary() |> Msgpack.decode!() == ext
    end
  end

  test "invalid input is rejected with a clear error" do
    assert {:error, %Msgpack.EncodeError{message: msg}} = Msgpack.encode(<<0xFF, 0xFE>>)
    assert msg =~ "not valid UTF-8"
    assert {:error, %Msgpack.EncodeError{}} = Msgpack.encode(2 ** 64)
    assert {:error, %Msgpack.EncodeError{}} = Msgpack.encode(-(2 ** 63) - 1)
    assert {:error, %Msgpack.EncodeError{}} = Msgpack.encode({:tuple})
    assert {:error, %Msgpack.EncodeError{message: improper}} = Msgpack.encode(%{"a" => [1, 2 | 3]})
    assert improper =~ "improper list"
    assert {:error, %Msgpack.DecodeError{}} = Msgpack.decode(<<0x92, 0x01>>)
    assert {:error, %Msgpack.DecodeError{}} = Msgpack.decode(<<0xC1>>)
    assert {:error, %Msgpack.DecodeError{message: trailing}} = Msgpack.decode(<<0x01, 0x02>>)
    assert trailing =~ "trailing"
    assert {:error, %Msgpack.DecodeError{}} = Msgpack.decode(<<0xA2, 0xFF, 0xFE>>)
  end
end
