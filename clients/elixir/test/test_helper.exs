defmodule LMPort.TestJSON do
  @moduledoc "A minimal JSON decoder for the shared test vectors (the client has no dependencies, OTP 25 no :json)."

  def decode!(text) do
    {value, rest} = value(skip(text))
    "" = skip(rest)
    value
  end

  defp skip(<<c, rest::binary>>) when c in ~c[ \t\r\n], do: skip(rest)
  defp skip(rest), do: rest

  defp value("null" <> r), do: {nil, r}
  defp value("true" <> r), do: {true, r}
  defp value("false" <> r), do: {false, r}
  defp value("\"" <> r), do: string(r, [])
  defp value("[" <> r), do: array(skip(r), [])
  defp value("{" <> r), do: object(skip(r), [])
  defp value(r), do: number(r)

  defp array("]" <> r, []), do: {[], r}

  defp array(r, acc) do
    {v, r} = value(skip(r))

    case skip(r) do
      "," <> r -> array(skip(r), [v | acc])
      "]" <> r -> {Enum.reverse([v | acc]), r}
    end
  end

  defp object("}" <> r, []), do: {%{}, r}

  defp object("\"" <> r, acc) do
    {k, r} = string(r, [])
    ":" <> r = skip(r)
    {v, r} = value(skip(r))

    case skip(r) do
      "," <> r -> object(skip(r), [{k, v} | acc])
      "}" <> r -> {Map.new([{k, v} | acc]), r}
    end
  end

  defp string("\"" <> r, acc), do: {IO.iodata_to_binary(Enum.reverse(acc)), r}
  defp string("\\u" <> <<h::binary-4, r::binary>>, acc), do: unicode(String.to_integer(h, 16), r, acc)
  defp string("\\" <> <<c, r::binary>>, acc), do: string(r, [escape(c) | acc])
  defp string(<<c::utf8, r::binary>>, acc), do: string(r, [<<c::utf8>> | acc])

  defp unicode(hi, "\\u" <> <<l::binary-4, r::binary>>, acc) when hi in 0xD800..0xDBFF do
    lo = String.to_integer(l, 16)
    string(r, [<<0x10000 + (hi - 0xD800) * 0x400 + (lo - 0xDC00)::utf8>> | acc])
  end

  defp unicode(cp, r, acc), do: string(r, [<<cp::utf8>> | acc])

  defp escape(?n), do: "\n"
  defp escape(?t), do: "\t"
  defp escape(?r), do: "\r"
  defp escape(?b), do: "\b"
  defp escape(?f), do: "\f"
  defp escape(c), do: <<c>>

  defp number(r) do
    [num | _] = Regex.run(~r/^-?\d+(\.\d+)?([eE][-+]?\d+)?/, r)
    rest = binary_part(r, byte_size(num), byte_size(r) - byte_size(num))

    case Integer.parse(num) do
      {i, ""} -> {i, rest}
      _ -> {elem(Float.parse(num), 0), rest}
    end
  end
end

ExUnit.start()

defmodule LMPort.TestHelpers do
  @moduledoc "Polling and process-group checks shared by the worker tests."

  @doc "Options for test workers: one thread each, the machine is shared."
  def worker_opts(extra \\ []),
    do:
      Keyword.merge(
        [env: [{"OMP_NUM_THREADS", "1"}], grace_ms: 3_000, worker_args: ["--log-level", "WARNING"]],
        extra
      )

  @doc """
  Writes a scripted stand-in for the worker (an executable Python file run by the project's interpreter) and
  returns its path, for `python:`: the protocol's edge cases on demand. `scenario` is Python run after the helpers
  of the repo's tests/fake_worker.py (hello, recv, send, send_raw, respond), shared by every client.
  """
  def fake_worker(scenario) do
    {:ok, python} = LMPort.Python.find([])
    path = Path.join(System.tmp_dir!(), "lmport-fake-#{System.unique_integer([:positive])}.py")

    shared = Path.expand("../../../tests", __DIR__)

    File.write!(path, """
    #!#{python}
    import sys
    sys.path.insert(0, #{inspect(shared)})
    from fake_worker import *
    #{scenario}
    """)

    File.chmod!(path, 0o755)
    path
  end

  @doc "Is any process left in process group `pgid`?"
  defdelegate group_alive?(pgid), to: LMPort.ProcessGroup, as: :alive?

  @doc "Polls `fun` every 50 ms until it returns a truthy value (returned) or `timeout` ms pass (raises)."
  def wait_until(fun, timeout \\ 10_000, what \\ "condition") do
    deadline = System.monotonic_time(:millisecond) + timeout
    poll(fun, deadline, what)
  end

  defp poll(fun, deadline, what) do
    cond do
      value = fun.() ->
        value

      System.monotonic_time(:millisecond) > deadline ->
        raise ExUnit.AssertionError, message: "timed out waiting for #{what}"

      true ->
        Process.sleep(50) && poll(fun, deadline, what)
    end
  end
end
