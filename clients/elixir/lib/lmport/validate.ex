defmodule LMPort.Validate do
  @moduledoc """
  Local validation of request parameters against the manifest's parameter specs (`LMPort.Schema`), so a bad
  option fails at once, naming the field, instead of after a round trip.

  Checks unknown keys, required parameters, types (the manifest's type vocabulary: `str`, `int`, `float`,
  `bool`, `any`, `dict`, `handle`, `list`, `list[int]`, `list[float]`, `list[str]`, `list[dict]`, `null`, and
  unions joined with `|`; unknown types accept anything), `choices` and `min`/`max` (with `exclusive_min: true`
  the value must be > `min`). A `dict` parameter named after a schema (`sampling_params` -> `SamplingParams`) is
  checked field by field against that schema, as is each map of a list of them. Field paths in errors are the
  worker's: `sampling_params.temperature`, `sampling_params[1].max_tokens`.

  Values are normalised for the wire: keyword lists given for `dict` become maps, atoms given for `str` become
  strings, integers given for `float` become floats. `nil` for an optional parameter leaves it out.
  """
  alias LMPort.{Error, Schema}

  @known_types ~w(str int float bool null dict handle list list[int] list[float] list[str] list[dict])

  @type spec :: %{required(String.t()) => term}

  # Every type string of the manifest, split into its alternatives once, at compile time (a spec from elsewhere is
  # split when it is checked).
  @alternatives Schema.methods()
                |> Map.values()
                |> Enum.flat_map(& &1["params"])
                |> Enum.concat(Enum.concat(Map.values(Schema.schemas())))
                |> Enum.map(& &1["type"])
                |> Enum.filter(&is_binary/1)
                |> Map.new(&{&1, &1 |> String.split("|") |> Enum.map(fn alt -> String.trim(alt) end)})

  @doc "Validates `values` (atom or string keys) of `method` against `specs`; returns the wire params map."
  @spec params(String.t(), [spec], map | keyword) :: {:ok, map} | {:error, Error.t()}
  def params(method, specs, values), do: params(method, "", specs, values)

  # Walks the specs (no index of them is built per call): the values given are few, the specs a few dozen.
  defp params(method, prefix, specs, values) do
    values = Map.new(values, fn {k, v} -> {to_string(k), v} end)

    with :ok <- check_unknown(method, prefix, specs, values),
         :ok <- check_required(method, prefix, specs, values) do
      map_ok(specs, %{}, fn %{"name" => name} = spec, acc ->
        case values do
          %{^name => value} when value != nil ->
            with {:ok, v} <- field(method, prefix, spec, value), do: {:ok, Map.put(acc, name, v)}

          _ ->
            {:ok, acc}
        end
      end)
    end
  end

  defp check_unknown(method, prefix, specs, values) do
    case Enum.reject(Map.keys(values), fn key -> Enum.any?(specs, &(&1["name"] == key)) end) do
      [] ->
        :ok

      [name | _] ->
        allowed = specs |> Enum.map(& &1["name"]) |> Enum.sort() |> Enum.join(", ")
        invalid(method, prefix <> name, "is not an option (allowed: #{allowed})")
    end
  end

  defp check_required(method, prefix, specs, values) do
    case Enum.find(specs, &(&1["required"] && values[&1["name"]] == nil)) do
      nil -> :ok
      spec -> invalid(method, prefix <> spec["name"], "is required")
    end
  end

  defp field(method, prefix, spec, value) do
    path = prefix <> spec["name"]
    types = alternatives(spec["type"])

    with {:ok, value} <- typed(method, path, types, value),
         :ok <- check_choices(method, path, spec, value),
         :ok <- check_range(method, path, spec, value) do
      nested(method, path, Schema.schema_for_param(spec["name"]), value)
    end
  end

  defp alternatives(nil), do: ["any"]
  defp alternatives(type), do: Map.get_lazy(@alternatives, type, fn -> split(type) end)

  defp split(type), do: type |> String.split("|") |> Enum.map(&String.trim/1)

  defp typed(method, path, types, value) do
    case Enum.find_value(types, &coerce(&1, value)) do
      {:ok, v} -> {:ok, v}
      nil -> invalid(method, path, "must be #{Enum.join(types, " | ")}, got: #{inspect(value, limit: 8)}")
    end
  end

  # {:ok, wire_value} when `value` fits `type`, nil otherwise. Unknown types accept anything.
  defp coerce("str", v) when is_binary(v), do: {:ok, v}
  defp coerce("str", v) when is_atom(v) and not is_boolean(v) and not is_nil(v), do: {:ok, Atom.to_string(v)}
  defp coerce("int", v) when is_integer(v), do: {:ok, v}
  defp coerce("float", v) when is_float(v), do: {:ok, v}
  defp coerce("float", v) when is_integer(v), do: {:ok, v * 1.0}
  defp coerce("bool", v) when is_boolean(v), do: {:ok, v}
  defp coerce("null", nil), do: {:ok, nil}
  defp coerce("dict", v) when is_map(v) and not is_struct(v), do: {:ok, v}
  defp coerce("dict", v) when is_list(v), do: if(Keyword.keyword?(v), do: {:ok, Map.new(v)})
  defp coerce("handle", %{"ref" => ref} = v) when is_binary(ref), do: {:ok, v}
  defp coerce("handle", v) when is_binary(v), do: {:ok, v}
  defp coerce("list", v) when is_list(v), do: {:ok, v}
  defp coerce("list[int]", v) when is_list(v), do: if(Enum.all?(v, &is_integer/1), do: {:ok, v})

  defp coerce("list[float]", v) when is_list(v),
    do: if(Enum.all?(v, &is_number/1), do: {:ok, Enum.map(v, &(&1 * 1.0))})

  defp coerce("list[str]", v) when is_list(v), do: if(Enum.all?(v, &is_binary/1), do: {:ok, v})
  defp coerce("list[dict]", v) when is_list(v), do: all_dicts(v)
  defp coerce(type, _v) when type in @known_types, do: nil
  defp coerce(_any_or_unknown, v), do: {:ok, v}

  defp all_dicts(list) do
    dicts = Enum.map(list, &coerce("dict", &1))
    if Enum.all?(dicts, &match?({:ok, _}, &1)), do: {:ok, Enum.map(dicts, &elem(&1, 1))}
  end

  defp check_choices(method, path, %{"choices" => [_ | _] = choices}, value) do
    if value in choices,
      do: :ok,
      else:
        invalid(
          method,
          path,
          "must be one of #{Enum.map_join(choices, ", ", &inspect/1)}, got: #{inspect(value)}"
        )
  end

  defp check_choices(_method, _path, _spec, _value), do: :ok

  defp check_range(method, path, spec, value) when is_number(value) do
    cond do
      is_number(spec["min"]) and spec["exclusive_min"] == true and value <= spec["min"] ->
        invalid(method, path, "must be > #{spec["min"]}, got: #{value}")

      is_number(spec["min"]) and value < spec["min"] ->
        invalid(method, path, "must be >= #{spec["min"]}, got: #{value}")

      is_number(spec["max"]) and value > spec["max"] ->
        invalid(method, path, "must be <= #{spec["max"]}, got: #{value}")

      true ->
        :ok
    end
  end

  defp check_range(_method, _path, _spec, _value), do: :ok

  defp nested(_method, _path, nil, value), do: {:ok, value}
  defp nested(method, path, fields, value) when is_map(value), do: params(method, path <> ".", fields, value)

  defp nested(method, path, fields, values) when is_list(values) do
    values
    |> Enum.with_index()
    |> map_ok([], fn {value, i}, acc ->
      with {:ok, v} <- params(method, "#{path}[#{i}].", fields, value), do: {:ok, [v | acc]}
    end)
    |> case do
      {:ok, reversed} -> {:ok, Enum.reverse(reversed)}
      error -> error
    end
  end

  defp nested(_method, _path, _fields, value), do: {:ok, value}

  # Folds with `fun.(item, acc) :: {:ok, acc} | {:error, _}`, stopping at the first error.
  defp map_ok(enum, acc, fun) do
    Enum.reduce_while(enum, {:ok, acc}, fn item, {:ok, acc} ->
      case fun.(item, acc) do
        {:ok, acc} -> {:cont, {:ok, acc}}
        error -> {:halt, error}
      end
    end)
  end

  defp invalid(method, path, problem),
    do: {:error, Error.new("invalid_params", "#{method}: #{path} #{problem}", %{"field" => path})}
end
