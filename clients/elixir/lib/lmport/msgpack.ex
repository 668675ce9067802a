defmodule LMPort.Msgpack do
  @moduledoc """
  The msgpack codec of the lmport wire protocol (no Hex dependency, so the client builds offline).

  ## Type mapping

  | Elixir                                   | msgpack                                  |
  |------------------------------------------|------------------------------------------|
  | `nil`, `true`, `false`                   | nil, true, false                         |
  | integer (-2^63 .. 2^64-1)                | smallest int/uint format                 |
  | float                                    | float 64 (float 32 is decoded too)       |
  | `:nan`, `:infinity`, `:neg_infinity`     | float 64 NaN / +inf / -inf               |
  | binary (must be valid UTF-8)             | str                                      |
  | `%LMPort.Msgpack.Bin{data: bytes}`       | bin                                      |
  | other atom                               | str (its name), so `type: :request` works |
  | list                                     | array                                    |
  | map (keys encoded like values)           | map, keys sorted by their UTF-8 bytes     |
  | `%LMPort.Msgpack.Ext{type: t, data: d}`  | ext                                      |

  The str/bin rule is explicit rather than guessed: a plain Elixir binary is always text, and encoding one that
  is not valid UTF-8 raises `LMPort.Msgpack.EncodeError` (a peer decoding it as a string would fail anyway).
  Raw bytes travel only when wrapped in `LMPort.Msgpack.Bin`, and a decoded bin comes back wrapped, so
  `decode(encode(x)) == x` for every encodable `x`. Decoding never creates atoms: decoded keys are strings.

  Map keys are written in sorted order (atoms by their name), as the shared protocol vectors are, so the
  encoding of a value is canonical and byte-comparable with every other lmport client.
  """

  import Bitwise

  defmodule Bin do
    @moduledoc "Raw bytes, encoded as msgpack bin (a plain binary is encoded as str)."
    @enforce_keys [:data]
    defstruct [:data]
    @type t :: %__MODULE__{data: binary}
  end

  defmodule Ext do
    @moduledoc "A msgpack extension value (unused by protocol v1; kept so nothing is lost)."
    @enforce_keys [:type, :data]
    defstruct [:type, :data]
    @type t :: %__MODULE__{type: -128..127, data: binary}
  end

  defmodule EncodeError do
    defexception [:message]
  end

  defmodule DecodeError do
    defexception [:message]
  end

  @type value ::
          nil
          | boolean
          | integer
          | float
          | :nan
          | :infinity
          | :neg_infinity
          | binary
          | atom
          | Bin.t()
          | Ext.t()
          | [value]
          | %{optional(value) => value}

  ## Encoding

  @doc "Encodes a term as one msgpack value (iodata). Raises `EncodeError` for what cannot be encoded."
  @spec encode!(value) :: iodata
  def encode!(term), do: enc(term)

  @doc "Like `encode!/1`, returning `{:ok, binary}` or `{:error, %EncodeError{}}`."
  @spec encode(value) :: {:ok, binary} | {:error, EncodeError.t()}
  def encode(term) do
    {:ok, IO.iodata_to_binary(enc(term))}
  rescue
    e in EncodeError -> {:error, e}
  end

  defp enc(nil), do: <<0xC0>>
  defp enc(false), do: <<0xC2>>
  defp enc(true), do: <<0xC3>>
  defp enc(:nan), do: <<0xCB, 0x7FF8::16, 0::48>>
  defp enc(:infinity), do: <<0xCB, 0x7FF0::16, 0::48>>
  defp enc(:neg_infinity), do: <<0xCB, 0xFFF0::16, 0::48>>
  defp enc(i) when is_integer(i), do: enc_int(i)
  defp enc(f) when is_float(f), do: <<0xCB, f::float-64>>

  defp enc(s) when is_binary(s) do
    if String.valid?(s),
      do: [str_header(byte_size(s)), s],
      else:
        raise(EncodeError,
          message:
            "binary is not valid UTF-8 (wrap raw bytes in LMPort.Msgpack.Bin): #{inspect(s, limit: 16)}"
        )
  end

  defp enc(a) when is_atom(a), do: enc(Atom.to_string(a))
  defp enc(%Bin{data: d}) when is_binary(d), do: [bin_header(byte_size(d)), d]

  defp enc(%Ext{type: t, data: d}) when is_integer(t) and t in -128..127 and is_binary(d),
    do: [ext_header(byte_size(d), t), d]

  defp enc(list) when is_list(list), do: enc_list(list, [], 0)

  defp enc(map) when is_map(map) and not is_struct(map) do
    pairs = Enum.sort_by(map, fn {k, _} -> if is_atom(k), do: Atom.to_string(k), else: k end)
    [map_header(map_size(map)) | Enum.map(pairs, fn {k, v} -> [enc(k), enc(v)] end)]
  end

  defp enc(other), do: raise(EncodeError, message: "cannot encode #{inspect(other, limit: 8)} as msgpack")

  defp enc_list([], acc, n), do: [array_header(n) | Enum.reverse(acc)]
  defp enc_list([item | rest], acc, n), do: enc_list(rest, [enc(item) | acc], n + 1)

  defp enc_list(tail, _acc, _n),
    do: raise(EncodeError, message: "cannot encode an improper list (tail: #{inspect(tail, limit: 8)})")

  # Same choices as msgpack-python: non-negative -> fixint/uint*, negative -> negative fixint/int*.
  defp enc_int(i) when i >= 0 and i < 0x80, do: <<i>>
  defp enc_int(i) when i >= 0 and i <= 0xFF, do: <<0xCC, i>>
  defp enc_int(i) when i >= 0 and i <= 0xFFFF, do: <<0xCD, i::16>>
  defp enc_int(i) when i >= 0 and i <= 0xFFFFFFFF, do: <<0xCE, i::32>>
  defp enc_int(i) when i >= 0 and i <= 0xFFFFFFFFFFFFFFFF, do: <<0xCF, i::64>>
  defp enc_int(i) when i < 0 and i >= -32, do: <<i::signed-8>>
  defp enc_int(i) when i < 0 and i >= -0x80, do: <<0xD0, i::signed-8>>
  defp enc_int(i) when i < 0 and i >= -0x8000, do: <<0xD1, i::signed-16>>
  defp enc_int(i) when i < 0 and i >= -0x80000000, do: <<0xD2, i::signed-32>>
  defp enc_int(i) when i < 0 and i >= -0x8000000000000000, do: <<0xD3, i::signed-64>>
  defp enc_int(i), do: raise(EncodeError, message: "integer #{i} does not fit in 64 bits")

  defp str_header(n) when n < 32, do: <<0xA0 ||| n>>
  defp str_header(n) when n <= 0xFF, do: <<0xD9, n>>
  defp str_header(n) when n <= 0xFFFF, do: <<0xDA, n::16>>
  defp str_header(n) when n <= 0xFFFFFFFF, do: <<0xDB, n::32>>

  defp bin_header(n) when n <= 0xFF, do: <<0xC4, n>>
  defp bin_header(n) when n <= 0xFFFF, do: <<0xC5, n::16>>
  defp bin_header(n) when n <= 0xFFFFFFFF, do: <<0xC6, n::32>>

  defp array_header(n) when n < 16, do: <<0x90 ||| n>>
  defp array_header(n) when n <= 0xFFFF, do: <<0xDC, n::16>>
  defp array_header(n) when n <= 0xFFFFFFFF, do: <<0xDD, n::32>>

  defp map_header(n) when n < 16, do: <<0x80 ||| n>>
  defp map_header(n) when n <= 0xFFFF, do: <<0xDE, n::16>>
  defp map_header(n) when n <= 0xFFFFFFFF, do: <<0xDF, n::32>>

  defp ext_header(1, t), do: <<0xD4, t::signed-8>>
  defp ext_header(2, t), do: <<0xD5, t::signed-8>>
  defp ext_header(4, t), do: <<0xD6, t::signed-8>>
  defp ext_header(8, t), do: <<0xD7, t::signed-8>>
  defp ext_header(16, t), do: <<0xD8, t::signed-8>>
  defp ext_header(n, t) when n <= 0xFF, do: <<0xC7, n, t::signed-8>>
  defp ext_header(n, t) when n <= 0xFFFF, do: <<0xC8, n::16, t::signed-8>>
  defp ext_header(n, t) when n <= 0xFFFFFFFF, do: <<0xC9, n::32, t::signed-8>>

  ## Decoding

  @doc "Decodes a binary holding exactly one msgpack value."
  @spec decode(binary) :: {:ok, value} | {:error, DecodeError.t()}
  def decode(bin) when is_binary(bin) do
    {:ok, decode!(bin)}
  rescue
    e in DecodeError -> {:error, e}
  end

  @doc "Like `decode/1`, raising `DecodeError` on malformed or trailing input."
  @spec decode!(binary) :: value
  def decode!(bin) when is_binary(bin) do
    case dec(bin) do
      {value, <<>>} ->
        value

      {_value, rest} ->
        raise DecodeError, message: "#{byte_size(rest)} trailing bytes after the msgpack value"
    end
  end

  defp dec(<<0xC0, r::binary>>), do: {nil, r}
  defp dec(<<0xC2, r::binary>>), do: {false, r}
  defp dec(<<0xC3, r::binary>>), do: {true, r}
  defp dec(<<i, r::binary>>) when i < 0x80, do: {i, r}
  defp dec(<<i::signed-8, r::binary>>) when i >= -32, do: {i, r}
  defp dec(<<0xCC, i, r::binary>>), do: {i, r}
  defp dec(<<0xCD, i::16, r::binary>>), do: {i, r}
  defp dec(<<0xCE, i::32, r::binary>>), do: {i, r}
  defp dec(<<0xCF, i::64, r::binary>>), do: {i, r}
  defp dec(<<0xD0, i::signed-8, r::binary>>), do: {i, r}
  defp dec(<<0xD1, i::signed-16, r::binary>>), do: {i, r}
  defp dec(<<0xD2, i::signed-32, r::binary>>), do: {i, r}
  defp dec(<<0xD3, i::signed-64, r::binary>>), do: {i, r}
  defp dec(<<0xCA, f::binary-4, r::binary>>), do: {float32(f), r}
  defp dec(<<0xCB, f::binary-8, r::binary>>), do: {float64(f), r}
  defp dec(<<h, r::binary>>) when (h &&& 0xE0) == 0xA0, do: str(h &&& 0x1F, r)
  defp dec(<<0xD9, n, r::binary>>), do: str(n, r)
  defp dec(<<0xDA, n::16, r::binary>>), do: str(n, r)
  defp dec(<<0xDB, n::32, r::binary>>), do: str(n, r)
  defp dec(<<0xC4, n, r::binary>>), do: bin(n, r)
  defp dec(<<0xC5, n::16, r::binary>>), do: bin(n, r)
  defp dec(<<0xC6, n::32, r::binary>>), do: bin(n, r)
  defp dec(<<h, r::binary>>) when (h &&& 0xF0) == 0x90, do: array(h &&& 0x0F, r, [])
  defp dec(<<0xDC, n::16, r::binary>>), do: array(n, r, [])
  defp dec(<<0xDD, n::32, r::binary>>), do: array(n, r, [])
  defp dec(<<h, r::binary>>) when (h &&& 0xF0) == 0x80, do: map(h &&& 0x0F, r, [])
  defp dec(<<0xDE, n::16, r::binary>>), do: map(n, r, [])
  defp dec(<<0xDF, n::32, r::binary>>), do: map(n, r, [])
  defp dec(<<0xD4, t::signed-8, r::binary>>), do: ext(1, t, r)
  defp dec(<<0xD5, t::signed-8, r::binary>>), do: ext(2, t, r)
  defp dec(<<0xD6, t::signed-8, r::binary>>), do: ext(4, t, r)
  defp dec(<<0xD7, t::signed-8, r::binary>>), do: ext(8, t, r)
  defp dec(<<0xD8, t::signed-8, r::binary>>), do: ext(16, t, r)
  defp dec(<<0xC7, n, t::signed-8, r::binary>>), do: ext(n, t, r)
  defp dec(<<0xC8, n::16, t::signed-8, r::binary>>), do: ext(n, t, r)
  defp dec(<<0xC9, n::32, t::signed-8, r::binary>>), do: ext(n, t, r)
  defp dec(<<0xC1, _::binary>>), do: raise(DecodeError, message: "reserved byte 0xc1")
  defp dec(<<>>), do: raise(DecodeError, message: "unexpected end of input")

  defp dec(<<h, _::binary>>),
    do: raise(DecodeError, message: "truncated value (type byte 0x#{Integer.to_string(h, 16)})")

  defp str(n, r) do
    case r do
      <<s::binary-size(n), rest::binary>> ->
        if String.valid?(s), do: {s, rest}, else: raise(DecodeError, message: "str is not valid UTF-8")

      _ ->
        raise DecodeError, message: "truncated str"
    end
  end

  defp bin(n, r) do
    case r do
      <<b::binary-size(n), rest::binary>> -> {%Bin{data: b}, rest}
      _ -> raise DecodeError, message: "truncated bin"
    end
  end

  defp ext(n, t, r) do
    case r do
      <<d::binary-size(n), rest::binary>> -> {%Ext{type: t, data: d}, rest}
      _ -> raise DecodeError, message: "truncated ext"
    end
  end

  defp array(0, r, acc), do: {Enum.reverse(acc), r}

  defp array(n, r, acc) do
    {v, r} = dec(r)
    array(n - 1, r, [v | acc])
  end

  defp map(0, r, acc), do: {Map.new(acc), r}

  defp map(n, r, acc) do
    {k, r} = dec(r)
    {v, r} = dec(r)
    map(n - 1, r, [{k, v} | acc])
  end

  # Erlang floats cannot hold NaN or infinities; they decode to the atoms that encode back to them.
  defp float64(<<0x7FF::12, 0::52>>), do: :infinity
  defp float64(<<0xFFF::12, 0::52>>), do: :neg_infinity
  defp float64(<<_::1, 0x7FF::11, _::52>>), do: :nan
  defp float64(<<f::float-64>>), do: f

  defp float32(<<0x7F800000::32>>), do: :infinity
  defp float32(<<0xFF800000::32>>), do: :neg_infinity
  defp float32(<<_::1, 0xFF::8, _::23>>), do: :nan
  defp float32(<<f::float-32>>), do: f
end
